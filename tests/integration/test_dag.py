"""The stage DAG on real Ray + MLflow: end to end, resume skips completed stages, --force, failures."""

from __future__ import annotations

import mlflow
import pytest

from pipelines.dag import STAGES, StageError, plan, read_record, run_pipeline

from .conftest import tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def first_run(ray_session, trained_model, tiny_cfg):
    """The whole pipeline on the shared tiny workspace (train resumes the shared run: already complete)."""
    logs: list[str] = []
    res = run_pipeline(tiny_cfg, log=logs.append)
    return res, logs


def test_end_to_end(first_run, tiny_cfg, trained_model):
    res, logs = first_run
    assert res.ran == list(STAGES) and res.skipped == []
    assert res.results["train"]["model_version"] == trained_model.model_version  # same run, not retrained
    assert res.results["promote"]["decision"] == "promoted"  # first model in this registry: champion
    client = mlflow.MlflowClient(tiny_cfg.tracking_uri)
    champion = client.get_model_version_by_alias(tiny_cfg.registry.model_name, tiny_cfg.registry.champion_alias)
    assert str(champion.version) == trained_model.model_version
    deployed = res.results["deploy"]
    assert deployed["smoke_test"]["images"] == 1 and deployed["still_serving"] is False
    assert deployed["model"]["version"] == trained_model.model_version
    # one parent run, one nested run per stage, each FINISHED with inputs/outputs recorded
    children = client.search_runs([client.get_run(res.parent_run_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    stages = {r.data.tags.get("stage"): r for r in children if r.data.tags.get("stage")}
    assert set(stages) == set(STAGES)
    assert all(r.info.status == "FINISHED" and "outputs" in r.data.tags for r in stages.values())


def test_rerun_skips_completed_stages(first_run, tiny_cfg):
    logs: list[str] = []
    res = run_pipeline(tiny_cfg, until="promote", log=logs.append)
    assert res.ran == [] and res.skipped == ["prepare_data", "train", "evaluate", "promote"]
    assert any("train: up to date" in line for line in logs)


def test_force_reruns_a_stage_and_everything_after(first_run, tiny_cfg):
    before = read_record(tiny_cfg, "train")
    res = run_pipeline(tiny_cfg, until="promote", force=["evaluate"], log=lambda _: None)
    assert res.skipped == ["prepare_data", "train"] and res.ran == ["evaluate", "promote"]
    assert read_record(tiny_cfg, "train") == before


def test_changed_config_reruns_downstream_only(first_run, tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.evaluate.promote_margin = 0.5
    res = run_pipeline(cfg, until="promote", log=lambda _: None)
    assert res.skipped == ["prepare_data", "train", "evaluate"] and res.ran == ["promote"]


def test_failing_stage_is_named_and_earlier_outputs_survive(first_run, tiny_cfg):
    before = {s: read_record(tiny_cfg, s) for s in ("prepare_data", "train")}
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.evaluate.primary_metric = "bpd"  # a valid config that evaluate cannot serve: bits/dim is switched off
    cfg.evaluate.bpd_subset = 0
    with pytest.raises(StageError, match="stage 'evaluate' failed|stage 'promote' failed"):
        run_pipeline(cfg, until="promote", force=["evaluate"], log=lambda _: None)
    assert {s: read_record(tiny_cfg, s) for s in before} == before
    assert read_record(tiny_cfg, "prepare_data").result["manifest_path"]


def test_from_needs_completed_upstream(ray_session, tmp_path):
    with pytest.raises(StageError, match="stage 'prepare_data' has never completed"):
        run_pipeline(tiny_config(tmp_path), start="train", log=lambda _: None)


@pytest.mark.parametrize(("kw", "msg"), [({"start": "nope"}, "unknown stage 'nope'"),
                                         ({"force": ["trian"]}, "unknown stage 'trian'"),
                                         ({"start": "deploy", "until": "train"}, "comes after")])
def test_plan_validates_stage_names(tiny_cfg, kw, msg):
    with pytest.raises(ValueError, match=msg):
        plan(tiny_cfg, kw.get("start"), kw.get("until"), kw.get("force", []))
