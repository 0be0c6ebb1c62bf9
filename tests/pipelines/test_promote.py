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
    with pytest.raises(ConfigError, match="evaluate.primary_metric"):
        promote(_with(cfg, primary_metric="psnr"), name, "2", {"psnr": 3.0})
    with pytest.raises(ValueError, match="not found"):
        promote(cfg, name, "99", {"frechet_distance": 1.0})
