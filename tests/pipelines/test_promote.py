"""The promotion gate's rule on a real (SQLite) MLflow registry, without Ray or trained models."""

from __future__ import annotations

import math

import mlflow
import pytest

from pipelines.config import ConfigError, load_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite registry for the module (creating one costs seconds)."""
    from pipelines.tracking import setup_mlflow

    root = tmp_path_factory.mktemp("gate")
    with pytest.MonkeyPatch.context() as mp:
        # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which the config prefers to the workspace's SQLite
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = load_config(None, [f"workspace.root={root}"])
        setup_mlflow(cfg)
        yield cfg, root


@pytest.fixture
def registry(store, request):
    """A fresh registered model (named after the test) with four bare versions."""
    cfg, root = store
    client = mlflow.MlflowClient()
    name = request.node.name
    client.create_registered_model(name)
    for _ in range(4):
        client.create_model_version(name, source=root.as_uri())
    return cfg, client, name


def _with(cfg, **evaluate):
    cfg = cfg.model_copy(deep=True)
    for k, v in evaluate.items():
        setattr(cfg.evaluate, k, v)
    return cfg


def _champion(client, name) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def test_lower_is_better_with_relative_margin(registry):
    from pipelines.evaluate import promote

    cfg, client, name = registry
    cfg = _with(cfg, promote_margin=0.1)
    first = promote(cfg, name, "1", {"frechet_distance": 10.0})
    assert first.decision == "promoted" and first.champion_version is None and _champion(client, name) == "1"
    # 9.5 beats 10 but not by 10%: needs < 9.0
    close = promote(cfg, name, 2, {"frechet_distance": 9.5})
    assert close.decision == "rejected" and not close.promoted
    assert (close.value, close.champion_value, close.champion_version) == (9.5, 10.0, "1")
    tags = client.get_model_version(name, "2").tags
    assert "does not beat" in tags["rejected"] and "9" in tags["rejected"]
    assert tags["promotion.value"] == "9.5" and tags["promotion.champion_value"] == "10.0"
    assert "rejected" in client.get_model_version(name, "2").description
    assert _champion(client, name) == "1"
    better = promote(cfg, name, "3", {"frechet_distance": 8.9})
    assert better.decision == "promoted" and _champion(client, name) == "3"
    assert client.get_model_version(name, "1").tags["superseded_by"] == "3"
    # a rejected version that is later good enough loses its rejected tag
    again = promote(cfg, name, "2", {"frechet_distance": 5.0})
    assert again.decision == "promoted" and "rejected" not in client.get_model_version(name, "2").tags
    assert promote(cfg, name, "2", {"frechet_distance": 5.0}).decision == "already_champion"


def test_ties_and_non_finite_are_rejected(registry):
    from pipelines.evaluate import promote

    cfg, client, name = registry
    promote(cfg, name, "1", {"frechet_distance": 4.0})
    assert promote(cfg, name, "2", {"frechet_distance": 4.0}).decision == "rejected"  # margin 0: strict
    nan = promote(cfg, name, "3", {"frechet_distance": math.nan})
    assert nan.decision == "rejected" and "not finite" in nan.reason


def test_higher_is_better_metric(registry):
    from pipelines.evaluate import promote

    cfg, client, name = registry
    cfg = _with(cfg, primary_metric="class_accuracy", promote_margin=0.05)
    promote(cfg, name, "1", {"class_accuracy": 0.80})
    worse = promote(cfg, name, "2", {"class_accuracy": 0.50})
    assert worse.decision == "rejected" and worse.higher_is_better and "higher is better" in worse.reason
    small = promote(cfg, name, "3", {"class_accuracy": 0.83})  # needs > 0.84
    assert small.decision == "rejected"
    assert promote(cfg, name, "4", {"class_accuracy": 0.90}).decision == "promoted"
    assert _champion(client, name) == "4"


def test_champion_without_recorded_metric_and_bad_inputs(registry):
    from pipelines.evaluate import promote

    cfg, client, name = registry
    client.set_registered_model_alias(name, "champion", "1")  # set by hand, never evaluated
    res = promote(cfg, name, "2", {"frechet_distance": 1.0})
    assert res.decision == "rejected" and "no recorded frechet_distance" in res.reason
    with pytest.raises(ValueError, match="no such entry"):
        promote(cfg, name, "2", {"bpd": 3.0})
    with pytest.raises(ValueError, match="not found"):
        promote(cfg, name, "99", {"frechet_distance": 1.0})


def test_primary_metric_is_checked_when_the_config_loads():
    from typing import get_args

    from pipelines.config import HIGHER_IS_BETTER, LOWER_IS_BETTER, PrimaryMetric
    from pipelines.evaluate import metric_direction

    assert set(get_args(PrimaryMetric)) == set(LOWER_IS_BETTER) | set(HIGHER_IS_BETTER)
    assert [metric_direction(m) for m in HIGHER_IS_BETTER] == [True] * len(HIGHER_IS_BETTER)
    assert [metric_direction(m) for m in LOWER_IS_BETTER] == [False] * len(LOWER_IS_BETTER)
    with pytest.raises(ConfigError, match=r"evaluate\.primary_metric: .*'frechet_distance'.*'inception_score'"):
        load_config(None, ["evaluate.primary_metric=psnr"])


def test_non_finite_metric_is_never_promoted_even_without_a_champion(registry):
    from pipelines.evaluate import promote

    cfg, client, name = registry
    for bad in (math.nan, math.inf):
        res = promote(cfg, name, "1", {"frechet_distance": bad})
        assert res.decision == "rejected" and not res.promoted and "not finite" in res.reason
    assert client.get_registered_model(name).aliases == {}
    assert "not finite" in client.get_model_version(name, "1").tags["rejected"]
    higher = _with(cfg, primary_metric="class_accuracy")
    assert promote(higher, name, "2", {"class_accuracy": math.nan}).decision == "rejected"
    assert client.get_registered_model(name).aliases == {}
    assert promote(cfg, name, "3", {"frechet_distance": 2.0}).decision == "promoted"


@pytest.mark.parametrize("start_with_champion", [True, False])
def test_champion_changing_during_the_gate_is_refused(registry, monkeypatch, start_with_champion):
    """A rival gate moves the alias to v3 right after this gate read the champion: promoting v2 now would
    replace a champion it was never compared with, so the gate refuses and writes nothing."""
    from pipelines.evaluate import PromotionConflict, promote

    cfg, client, name = registry
    if start_with_champion:
        promote(cfg, name, "1", {"frechet_distance": 10.0})
    client.set_model_version_tag(name, "3", "eval.frechet_distance", "0.5")  # the rival's (better) number
    real = mlflow.MlflowClient.get_model_version_by_alias
    calls = {"n": 0}

    def racing(self, model, alias):
        try:
            return real(self, model, alias)  # raises when there is no champion yet
        finally:
            calls["n"] += 1
            if calls["n"] == 1:  # the rival commits between this gate's read and its alias move
                client.set_registered_model_alias(name, "champion", "3")

    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias", racing)
    with pytest.raises(PromotionConflict, match=r"changed from (v1|none) to v3 while gating v2"):
        promote(cfg, name, "2", {"frechet_distance": 1.0})
    monkeypatch.undo()
    assert _champion(client, name) == "3"
    tags = client.get_model_version(name, "2").tags
    assert not any(k.startswith("promotion.") for k in tags) and "rejected" not in tags
    # run again: compared with the new champion (0.5), 1.0 does not beat it
    again = promote(cfg, name, "2", {"frechet_distance": 1.0})
    assert again.decision == "rejected" and again.champion_version == "3" and _champion(client, name) == "3"
