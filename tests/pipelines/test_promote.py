"""The promotion gate's rule on a real (SQLite) MLflow registry, without Ray or trained models.

Each version has a LoggedModel; :func:`_gate` stands in for ``evaluate``: it logs the metrics against the version's
LoggedModel on an evaluation run (as the stage does), then runs the gate, which reads the champion's number back
from there."""

from __future__ import annotations

import math

import mlflow
import pytest

from pipelines.config import ConfigError, load_config
from tests.pipelines.conftest import sqlite_mlflow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite registry for the module (creating one costs seconds)."""
    root = tmp_path_factory.mktemp("gate")
    with sqlite_mlflow(root) as (cfg, _):
        yield cfg, root


@pytest.fixture
def registry(store, request):
    """A fresh registered model (named after the test) with four versions, each with its own LoggedModel."""
    cfg, root = store
    client = mlflow.MlflowClient()
    name = request.node.name
    exp = client.get_experiment_by_name(cfg.registry.experiment_name).experiment_id
    client.create_registered_model(name)
    for _ in range(4):
        lm = client.create_logged_model(exp, name="model")
        client.create_model_version(name, source=f"models:/{lm.model_id}", model_id=lm.model_id)
    return cfg, client, name


def _evaluated(cfg, name, version, metrics, setup="setup-a") -> None:
    """What evaluate records: the metrics on a run and against the version's LoggedModel, the run's setup tag."""
    from pipelines.evaluate import SETUP_TAG
    from pipelines.evaluate.gate import version_model_id

    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, str(version))
    exp = client.get_experiment_by_name(cfg.registry.experiment_name).experiment_id
    run_id = client.create_run(exp, tags={SETUP_TAG: setup}).info.run_id
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}  # evaluate logs finite metrics only
    mlflow.log_metrics(finite, run_id=run_id, model_id=version_model_id(mv))
    client.set_terminated(run_id)


def _gate(cfg, name, version, metrics, setup="setup-a"):
    from pipelines.evaluate import promote

    _evaluated(cfg, name, version, metrics, setup)
    return promote(cfg, name, version, metrics)


def _with(cfg, **evaluate):
    cfg = cfg.model_copy(deep=True)
    for k, v in evaluate.items():
        setattr(cfg.evaluate, k, v)
    return cfg


def _champion(client, name) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def test_lower_is_better_with_relative_margin(registry):
    cfg, client, name = registry
    cfg = _with(cfg, promote_margin=0.1)
    first = _gate(cfg, name, "1", {"frechet_distance": 10.0})
    assert first.decision == "promoted" and first.champion_version is None and _champion(client, name) == "1"
    # 9.5 beats 10 but not by 10%: needs < 9.0
    close = _gate(cfg, name, 2, {"frechet_distance": 9.5})
    assert close.decision == "rejected" and not close.promoted
    assert (close.value, close.champion_value, close.champion_version) == (9.5, 10.0, "1")
    tags = client.get_model_version(name, "2").tags
    assert "does not beat" in tags["rejected"] and "9" in tags["rejected"]
    assert tags["decision"] == "rejected" and tags["primary_metric"] == "frechet_distance = 9.5 (lower is better)"
    assert tags["compared_with"] == "v1 (frechet_distance = 10), margin 10.0%"
    assert "rejected" in client.get_model_version(name, "2").description
    assert _champion(client, name) == "1"
    better = _gate(cfg, name, "3", {"frechet_distance": 8.9})
    assert better.decision == "promoted" and _champion(client, name) == "3"
    assert client.get_model_version(name, "1").tags["superseded_by"] == "3"
    # a rejected version that is later good enough loses its rejected tag
    again = _gate(cfg, name, "2", {"frechet_distance": 5.0})
    assert again.decision == "promoted" and "rejected" not in client.get_model_version(name, "2").tags
    assert _gate(cfg, name, "2", {"frechet_distance": 5.0}).decision == "already_champion"


def test_ties_and_non_finite_are_rejected(registry):
    cfg, client, name = registry
    _gate(cfg, name, "1", {"frechet_distance": 4.0})
    assert _gate(cfg, name, "2", {"frechet_distance": 4.0}).decision == "rejected"  # margin 0: strict
    nan = _gate(cfg, name, "3", {"frechet_distance": math.nan})
    assert nan.decision == "rejected" and "not finite" in nan.reason


def test_higher_is_better_metric(registry):
    cfg, client, name = registry
    cfg = _with(cfg, primary_metric="class_accuracy", promote_margin=0.05)
    _gate(cfg, name, "1", {"class_accuracy": 0.80})
    worse = _gate(cfg, name, "2", {"class_accuracy": 0.50})
    assert worse.decision == "rejected" and worse.higher_is_better and "higher is better" in worse.reason
    small = _gate(cfg, name, "3", {"class_accuracy": 0.83})  # needs > 0.84
    assert small.decision == "rejected"
    assert _gate(cfg, name, "4", {"class_accuracy": 0.90}).decision == "promoted"
    assert _champion(client, name) == "4"


def test_champion_without_recorded_metric_and_bad_inputs(registry):
    from pipelines.evaluate import promote

    cfg, client, name = registry
    client.set_registered_model_alias(name, "champion", "1")  # set by hand, never evaluated
    res = _gate(cfg, name, "2", {"frechet_distance": 1.0})
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
    cfg, client, name = registry
    for bad in (math.nan, math.inf):
        res = _gate(cfg, name, "1", {"frechet_distance": bad})
        assert res.decision == "rejected" and not res.promoted and "not finite" in res.reason
    assert client.get_registered_model(name).aliases == {}
    assert "not finite" in client.get_model_version(name, "1").tags["rejected"]
    higher = _with(cfg, primary_metric="class_accuracy")
    assert _gate(higher, name, "2", {"class_accuracy": math.nan}).decision == "rejected"
    assert client.get_registered_model(name).aliases == {}
    assert _gate(cfg, name, "3", {"frechet_distance": 2.0}).decision == "promoted"


@pytest.mark.parametrize("start_with_champion", [True, False])
def test_champion_changing_during_the_gate_is_refused(registry, monkeypatch, start_with_champion):
    """A rival gate moves the alias to v3 right after this gate read the champion: promoting v2 now would
    replace a champion it was never compared with, so the gate refuses and writes nothing."""
    from pipelines.evaluate import PromotionConflict
    from pipelines.evaluate.gate import DECISION_TAGS

    cfg, client, name = registry
    if start_with_champion:
        _gate(cfg, name, "1", {"frechet_distance": 10.0})
    _evaluated(cfg, name, "3", {"frechet_distance": 0.5})  # the rival's (better) number
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
        _gate(cfg, name, "2", {"frechet_distance": 1.0})
    monkeypatch.undo()
    assert _champion(client, name) == "3"
    tags = client.get_model_version(name, "2").tags
    assert not set(DECISION_TAGS) & set(tags) and "rejected" not in tags
    # run again: compared with the new champion (0.5), 1.0 does not beat it
    again = _gate(cfg, name, "2", {"frechet_distance": 1.0})
    assert again.decision == "rejected" and again.champion_version == "3" and _champion(client, name) == "3"


def test_gate_reads_the_champions_latest_evaluation_and_leaves_few_version_tags(registry):
    """The champion's number is the newest one logged against its LoggedModel; the versions carry only the
    decision tags (no eval.* / promotion.* pile), and a different evaluation setup is noted in the reason."""
    from pipelines.evaluate import recorded_metric
    from pipelines.evaluate.gate import DECISION_TAGS, version_model_id

    cfg, client, name = registry
    assert recorded_metric(client, client.get_model_version(name, "1"), "frechet_distance") == (None, None)
    _gate(cfg, name, "1", {"frechet_distance": 10.0, "class_accuracy": 0.5})
    _evaluated(cfg, name, "1", {"frechet_distance": 3.0}, setup="setup-b")  # v1 evaluated again, differently
    assert recorded_metric(client, client.get_model_version(name, "1"), "frechet_distance") == (3.0, "setup-b")
    res = _gate(cfg, name, "2", {"frechet_distance": 5.0})  # beats 10 but not 3
    assert res.decision == "rejected" and res.champion_value == 3.0
    assert "different setups" in res.reason and "setup-a" in res.reason and "setup-b" in res.reason
    model = client.get_logged_model(version_model_id(client.get_model_version(name, "2")))
    assert {m.key: m.value for m in model.metrics} == {"frechet_distance": 5.0}
    assert _gate(cfg, name, "3", {"frechet_distance": 1.0}).decision == "promoted"
    allowed = {*DECISION_TAGS, "rejected", "superseded_by"}
    for v in ("1", "2", "3"):
        tags = client.get_model_version(name, v).tags
        assert set(tags) <= allowed and not any(k.startswith(("eval.", "promotion.")) for k in tags), tags
    assert client.get_model_version(name, "1").tags == {"decision": "promoted", "superseded_by": "3",
                                                         "primary_metric": "frechet_distance = 10 (lower is better)",
                                                         "compared_with": "none, margin 0.0%"}
