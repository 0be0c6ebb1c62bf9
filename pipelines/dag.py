"""The pipeline as a DAG of Ray tasks: prepare_data -> train -> evaluate -> promote -> deploy.

Each stage is a ``@ray.remote`` task; the next stage receives the previous one's ObjectRef, so Ray resolves the
dependencies (the task DAG) and stages run wherever the cluster has room. Stages exchange small pydantic results,
never tensors. The driver records every finished stage in ``<workspace.records_uri>/<stage>.json`` (the local
``workspace/pipeline/`` or, with ``workspace.store``, the shared object store, so a re-submitted cluster job sees
them) with a fingerprint of the config sections and upstream results it depends on; a later run skips stages whose
fingerprint matches and whose outputs still exist, and ``force`` re-runs a stage and everything after it. Records
are written atomically; a corrupt one is reported and counts as not done. One driver at a time per workspace:
:func:`workspace_lock`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from typing import Any

from pydantic import BaseModel

from pipelines import storage
from pipelines.config import PipelineConfig

logger = logging.getLogger(__name__)
STAGES = ("prepare_data", "train", "evaluate", "promote", "deploy")
# The config sections / fields each stage's output depends on (besides its upstream stage results), and the
# fields inside them that do not change that output.
STAGE_SECTIONS = {
    "prepare_data": ("data",),
    "train": ("data", "model", "diffusion", "train", "registry.model_name", "registry.experiment_name"),
    "evaluate": ("evaluate",),
    "promote": ("evaluate.primary_metric", "evaluate.promote_margin", "registry"),
    "deploy": ("serve", "registry"),
}
STAGE_EXCLUDE = {"prepare_data": ("data.prepare_tasks",), "train": ("data.prepare_tasks",),
                 "evaluate": ("evaluate.primary_metric", "evaluate.promote_margin")}
PARENT_TAG = "pipeline_run"


class StageError(RuntimeError):
    """A stage failed; the message names it. Earlier stages' outputs and records are kept."""


class StageRecord(BaseModel):
    stage: str
    fingerprint: str
    result: dict[str, Any]
    finished_at: float
    duration_s: float


class PipelineResult(BaseModel):
    ran: list[str]
    skipped: list[str]
    results: dict[str, dict[str, Any]]
    parent_run_id: str


def stage_fingerprint(cfg: PipelineConfig, stage: str, upstream: dict[str, Any] | None) -> str:
    sections = cfg.section_fingerprint(*STAGE_SECTIONS[stage], exclude=STAGE_EXCLUDE.get(stage, ()))
    payload = {"stage": stage, "sections": sections, "upstream": upstream}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record_uri(cfg: PipelineConfig, stage: str) -> str:
    return storage.join(cfg.workspace.records_uri, f"{stage}.json")


def read_record(cfg: PipelineConfig, stage: str) -> StageRecord | None:
    """The stage's record, or None when it never finished. A corrupt record is reported (naming the file) and
    counts as not done, so the stage re-runs and its next record replaces it."""
    uri = _record_uri(cfg, stage)
    try:
        return StageRecord.model_validate(storage.read_json(uri))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("stage record %s is unreadable or corrupt (%s: %s); treating stage '%s' as not done",
                    uri, type(e).__name__, str(e).splitlines()[0], stage)
        return None


def write_record(cfg: PipelineConfig, rec: StageRecord) -> None:
    """Write a stage record atomically: a unique temporary name + ``os.replace`` locally, one PUT on S3/GCS."""
    storage.write_bytes(_record_uri(cfg, rec.stage), rec.model_dump_json(indent=2).encode())


def workspace_lock(cfg: PipelineConfig) -> storage.StoreLock:
    """The lock one pipeline driver holds while it reads and writes the stage records of a workspace (local or
    ``workspace.store``); a second driver gets :class:`pipelines.storage.LockHeld` naming the holder."""
    return storage.StoreLock(storage.join(cfg.workspace.records_uri, ".lock"), what="pipeline workspace lock")


def outputs_exist(cfg: PipelineConfig, stage: str, result: dict[str, Any]) -> bool:
    """Is a recorded stage output still there (shards on disk, model version in the registry)?"""
    import mlflow

    try:
        if stage == "prepare_data":
            return storage.exists(str(result["manifest_path"]))
        if stage in ("train", "evaluate"):
            name, version = result.get("model_name"), result.get("model_version")
            return bool(name and version and mlflow.MlflowClient().get_model_version(name, version))
        if stage == "promote":
            return True
    except Exception:
        return False
    return False  # deploy always runs: a server is not an output that survives the driver


# ------------------------------------------------------------------------------------------------ stage bodies
def _nested_run(cfg: PipelineConfig, parent_run_id: str, stage: str):
    import mlflow

    from pipelines.tracking import setup_mlflow

    exp = setup_mlflow(cfg)
    return mlflow.MlflowClient().create_run(exp, run_name=stage,
                                            tags={"mlflow.parentRunId": parent_run_id, "stage": stage})


def _run_stage(cfg_dict: dict, stage: str, parent_run_id: str, names: list[str], *values: dict) -> dict[str, Any]:
    """Body of every stage task: a nested MLflow run with status, duration, inputs/outputs as tags.

    Upstream results arrive as positional arguments (``names[i]`` -> ``values[i]``): Ray resolves ObjectRefs
    only at the top level of a task's arguments, which is what chains the stages into a DAG.
    """
    import mlflow

    upstream = dict(zip(names, values, strict=True))
    cfg = PipelineConfig.model_validate(cfg_dict)
    run = _nested_run(cfg, parent_run_id, stage)
    client = mlflow.MlflowClient()
    client.set_tag(run.info.run_id, "inputs", json.dumps(upstream, default=str)[:5000])
    t0 = time.time()
    try:
        out = STAGE_FUNCS[stage](cfg, upstream, parent_run_id)
    except Exception as e:
        client.set_tag(run.info.run_id, "error", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(run.info.run_id, status="FAILED")
        raise StageError(f"stage '{stage}' failed: {type(e).__name__}: {e}\n{traceback.format_exc()}") from None
    client.set_tag(run.info.run_id, "outputs", json.dumps(out, default=str)[:5000])
    client.log_metric(run.info.run_id, "duration_s", time.time() - t0)
    client.set_terminated(run.info.run_id, status="FINISHED")
    return out


def _prepare(cfg: PipelineConfig, up: dict, parent: str) -> dict:
    from pipelines.data import prepare_data

    return prepare_data(cfg).model_dump(mode="json")


def _train(cfg: PipelineConfig, up: dict, parent: str) -> dict:
    from pipelines.data import DataResult
    from pipelines.train import run_training

    return run_training(cfg, DataResult.model_validate(up["prepare_data"]),
                        parent_run_id=parent).model_dump(mode="json")


def _evaluate(cfg: PipelineConfig, up: dict, parent: str) -> dict:
    from pipelines.data import DataResult
    from pipelines.evaluate import evaluate

    tr = up["train"]
    res = evaluate(cfg, tr["model_uri"], DataResult.model_validate(up["prepare_data"]), run_id=tr["mlflow_run_id"])
    return {**res.model_dump(mode="json"), "model_name": tr["model_name"], "model_version": tr["model_version"]}


def _promote(cfg: PipelineConfig, up: dict, parent: str) -> dict:
    from pipelines.evaluate import promote

    ev = up["evaluate"]
    return promote(cfg, ev["model_name"], ev["model_version"], ev["metrics"]).model_dump(mode="json")


def _deploy(cfg: PipelineConfig, up: dict, parent: str) -> dict:
    """Deploy the champion and prove it with one real HTTP request. Locally the app is then shut down (the CLI's
    ``--serve`` / ``serve.keep_alive`` keeps it); on a cluster it stays deployed after the driver exits."""
    import os

    from pipelines.serve import deploy_and_check, shutdown

    out = deploy_and_check(cfg).model_dump(mode="json")
    keep = cfg.serve.keep_alive or bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if not keep:
        shutdown()
    return {**out, "still_serving": keep}


STAGE_FUNCS = {"prepare_data": _prepare, "train": _train, "evaluate": _evaluate, "promote": _promote,
               "deploy": _deploy}


# Resources each stage task declares. Stage tasks orchestrate and reserve nothing themselves: training runs in
# Train workers (train.num_workers x cpus_per_worker / GPUs), evaluation in its own Ray tasks
# (evaluate.cpus_per_task, a GPU each when evaluate.use_gpu), serving in Serve replicas; a stage task that held a
# GPU while waiting on those would only block them.
STAGE_OPTIONS = {"num_cpus": 0, "num_gpus": 0}


# ------------------------------------------------------------------------------------------------ the driver
def plan(cfg: PipelineConfig, start: str | None, until: str | None, force: list[str]) -> list[str]:
    for name, value in (("--from", start), ("--until", until), *(("--force", f) for f in force)):
        if value is not None and value not in STAGES:
            raise ValueError(f"{name}: unknown stage '{value}'; stages are {', '.join(STAGES)}")
    lo = STAGES.index(start) if start else 0
    hi = STAGES.index(until) if until else len(STAGES) - 1
    if lo > hi:
        raise ValueError(f"--from {start} comes after --until {until}")
    return list(STAGES[lo : hi + 1])


def run_pipeline(cfg: PipelineConfig, *, start: str | None = None, until: str | None = None,
                 force: list[str] | None = None, log=print) -> PipelineResult:
    """Run the stages from ``start`` to ``until`` as chained Ray tasks, skipping up-to-date stages.

    The driver holds :func:`workspace_lock` throughout: a second driver on the same workspace (or store) is
    refused at once with :class:`pipelines.storage.LockHeld`, before it reads a record or starts a stage."""
    plan(cfg, start, until, force or [])  # a bad stage name is reported before the lock is taken
    with workspace_lock(cfg):
        return _run_locked(cfg, start=start, until=until, force=force, log=log)


def _run_locked(cfg: PipelineConfig, *, start: str | None, until: str | None, force: list[str] | None,
                log) -> PipelineResult:
    import mlflow
    import ray

    from pipelines.tracking import ensure_ray, setup_mlflow

    force = force or []
    stages = plan(cfg, start, until, force)
    forced_from = min((STAGES.index(f) for f in force), default=len(STAGES))
    exp = setup_mlflow(cfg)
    parent = mlflow.MlflowClient().create_run(exp, run_name=f"pipeline-{cfg.train.run_name}",
                                              tags={PARENT_TAG: cfg.train.run_name})
    parent_id = parent.info.run_id
    mlflow.MlflowClient().log_text(parent_id, json.dumps(cfg.to_dict(), indent=2), "pipeline_config.json")
    ensure_ray(cfg)
    remote = ray.remote(_run_stage)

    # Upstream results and fingerprints for stages before --from come from their records.
    results: dict[str, dict[str, Any]] = {}
    upstream_fps: dict[str, str] = {}
    for s in STAGES[: STAGES.index(stages[0])]:
        rec = read_record(cfg, s)
        if rec is None:
            raise StageError(f"--from {stages[0]}: stage '{s}' has never completed; run it first")
        results[s], upstream_fps[s] = rec.result, rec.fingerprint

    ran, skipped, pending = [], [], []  # pending: (stage, fingerprint, ref, t0)
    refs: dict[str, Any] = {}
    dirty = False  # a stage upstream re-runs -> everything after re-runs
    for s in stages:
        fp = stage_fingerprint(cfg, s, {k: upstream_fps[k] for k in STAGES[: STAGES.index(s)]})
        rec = read_record(cfg, s)
        if (not dirty and STAGES.index(s) < forced_from and rec is not None and rec.fingerprint == fp
                and outputs_exist(cfg, s, rec.result)):
            log(f"[pipeline] {s}: up to date (fingerprint {fp}), skipped")
            results[s] = rec.result
            upstream_fps[s] = fp
            skipped.append(s)
            continue
        dirty = True
        upstream = {k: refs.get(k, results.get(k)) for k in STAGES[: STAGES.index(s)]}
        log(f"[pipeline] {s}: submitted")
        refs[s] = remote.options(name=f"stage:{s}", **STAGE_OPTIONS).remote(
            cfg.to_dict(), s, parent_id, list(upstream), *upstream.values())
        pending.append((s, fp, refs[s], time.time()))
        upstream_fps[s] = fp

    client = mlflow.MlflowClient()
    previous_done = 0.0
    try:
        for s, fp, ref, submitted in pending:
            try:
                results[s] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(getattr(e, "cause", None), StageError) else e
                raise StageError(str(cause).split("\nTraceback")[0]) from None
            # a stage starts when its upstream finished (Ray runs it as soon as its inputs resolve)
            started = max(submitted, previous_done)
            previous_done = time.time()
            write_record(cfg, StageRecord(stage=s, fingerprint=fp, result=results[s], finished_at=previous_done,
                                          duration_s=previous_done - started))
            ran.append(s)
            log(f"[pipeline] {s}: done in {previous_done - started:.1f} s")
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id, status="FINISHED")
    return PipelineResult(ran=ran, skipped=skipped, results=results, parent_run_id=parent_id)

