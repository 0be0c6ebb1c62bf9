"""MLflow and Ray set-up shared by every stage (one place for tracking URI, experiment, local Ray limits)."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import mlflow

from pipelines.config import PipelineConfig

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# The MLflow UI opens an experiment of this kind on its training runs (without it: on the GenAI overview).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def setup_mlflow(cfg: PipelineConfig) -> str:
    """Point MLflow at the configured tracking URI and experiment; returns the experiment id.

    With the local default (SQLite in the workspace) artifacts go to ``workspace/mlartifacts``. The experiment is
    tagged ``mlflow.experimentKind=custom_model_development``.
    """
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        cfg.workspace.root.resolve().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.registry.experiment_name)
    if exp is None:
        location = cfg.workspace.mlartifacts.as_uri() if uri.startswith("sqlite:") else None
        return mlflow.create_experiment(cfg.registry.experiment_name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):  # made before the tag existed (a kind set by hand stays)
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists become strings), for ``mlflow.log_params``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v) if isinstance(v, list | tuple) else v
    return out


def mlflow_metrics(metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> list:
    """``mlflow.entities.Metric`` objects for ``MlflowClient.log_batch`` (non-finite values left out)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]


def _runs_with_tag(client, experiment_id: str, tag: str, value: str) -> list:
    """Active runs whose ``tag`` equals ``value``, oldest first (start time, then run id: one order for all)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1000)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def find_run(experiment_id: str, tag: str, value: str) -> str | None:
    """The oldest active run id in the experiment whose tag ``tag`` equals ``value`` (None if there is none)."""
    runs = _runs_with_tag(mlflow.MlflowClient(), experiment_id, tag, value)
    return runs[0].info.run_id if runs else None


# Seconds a creator waits before trusting that it won (the longest a rival's insert may lag its start time).
RACE_GRACE_S = 1.0


def find_or_create_run(experiment_id: str, tag: str, value: str, *, run_name: str,
                       tags: dict[str, str] | None = None, client=None) -> tuple[str, bool]:
    """The one run tagged ``tag=value``: (run id, whether this call created it). Safe against concurrent callers:
    a creator re-reads the runs carrying the tag (a winner once more after ``RACE_GRACE_S``) and keeps the
    oldest; a losing creator deletes its own run (tagged ``superseded_by``), so every caller ends with the same run
    id. MLflow has no compare-and-set, so a rival whose insert lags by more than the grace can still slip through."""
    client = client or mlflow.MlflowClient()
    existing = _runs_with_tag(client, experiment_id, tag, value)
    if existing:
        return existing[0].info.run_id, False
    mine = client.create_run(experiment_id, run_name=run_name, tags={**(tags or {}), tag: value}).info.run_id
    winner = _runs_with_tag(client, experiment_id, tag, value)[0].info.run_id
    if winner == mine:
        # A rival that stamped an older start time may not have been visible yet (its insert committed after our
        # re-read): look once more after a grace period, so both callers see both runs and keep the same one.
        time.sleep(RACE_GRACE_S)
        winner = _runs_with_tag(client, experiment_id, tag, value)[0].info.run_id
    if winner != mine:
        client.set_tag(mine, "superseded_by", winner)
        client.delete_run(mine)
    return winner, winner == mine


def ensure_ray(cfg: PipelineConfig) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS``, or start a small local Ray (dashboard on 127.0.0.1 only) if none runs."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Locally, advertise a few logical CPUs more than cores so the orchestration tasks, the Train controller,
    # the DDP workers and a Serve replica can coexist on a 2-core laptop; threads are set explicitly per worker.
    workers = cfg.train.num_workers * cfg.train.cpus_per_worker
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(workers) + 2)
    mem = cfg.ray.object_store_memory_mb
    # Train V2 prints worker output once through its own logger; its print patch would show every line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # The dashboard (on 127.0.0.1 only) serves the state API that Train V2's placement-group cleaner polls;
    # without it that actor logs a warning every second.
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             object_store_memory=mem * 1024 * 1024 if mem else None)
