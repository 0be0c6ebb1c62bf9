"""The evaluate stage: check the inputs, run the work units (:mod:`.tasks`) as named Ray jobs, assemble the gate
metrics, write the report (:mod:`.report`), log it to MLflow and tag the model version (:mod:`.gate`)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from pipelines.config import ConfigError, PipelineConfig, SamplerSpec
from pipelines.evaluate import report as R
from pipelines.evaluate import tasks as T
from pipelines.evaluate.gate import tag_version
from pipelines.evaluate.runner import Job, TaskRunner

log = logging.getLogger("pipelines.evaluate")

METRIC_PREFIX = "eval/"  # MLflow metric names: eval/frechet_distance, ...
GATE_KEYS = ("frechet_distance", "class_accuracy", "inception_score", "seconds_per_image")
NEEDS_CLASSIFIER = ("frechet_distance", "frechet_ratio", "class_accuracy", "inception_score")


class EvalResult(BaseModel):
    model_uri: str
    model_name: str | None = None
    model_version: str | None = None
    run_id: str
    metrics: dict[str, float]
    sampler_table: list[R.SamplerRow]
    report_json: str
    report_md: str
    report_artifact_dir: str  # artifact path of the reports inside the run
    grid_paths: list[str]
    skipped: dict[str, str]
    reference: dict[str, Any]


# ------------------------------------------------------------------------------------------------ checks
def _check(cfg: PipelineConfig, model, data, fid_factory) -> None:
    """Problems visible before any sampling: raise ConfigError naming the field."""
    ev = cfg.evaluate
    card_data = model.card.get("data", {})
    if (model.image_size, model.channels) != (data.image_size, data.channels):
        raise ConfigError(f"the model was trained on {model.image_size}x{model.image_size}x{model.channels} "
                          f"images but the data (data.image_size / data.channels) gives "
                          f"{data.image_size}x{data.image_size}x{data.channels}")
    if card_data.get("fingerprint") and card_data["fingerprint"] != data.fingerprint:
        log.warning("the model was trained on data %s; evaluating against data %s",
                    card_data["fingerprint"], data.fingerprint)
    if model.num_classes and data.num_classes and model.num_classes != data.num_classes:
        raise ConfigError(f"the model has {model.num_classes} classes but the data has {data.num_classes}")
    T_max = model.num_timesteps
    specs = [("evaluate.sampler", ev.sampler)] + [(f"evaluate.sampler_table[{i}]", s)
                                                   for i, s in enumerate(ev.sampler_table)]
    for where, s in specs:
        if s.steps > T_max:
            raise ConfigError(f"{where}.steps: {s.steps} exceeds the model's {T_max} diffusion steps (1..{T_max})")
    if ev.guidance_scale != 1.0 and not model.num_classes:
        raise ConfigError("evaluate.guidance_scale: classifier-free guidance needs a class-conditional model")
    _check_metric(cfg, model, data, fid_factory)


def _check_metric(cfg: PipelineConfig, model, data, fid_factory) -> None:
    """The primary metric (a Literal, so known) must be one this evaluation can produce."""
    ev = cfg.evaluate
    metric = ev.primary_metric
    if metric in NEEDS_CLASSIFIER and data.num_classes < 2:
        raise ConfigError(f"evaluate.primary_metric '{metric}' needs the reference classifier, which needs a "
                          "labelled dataset; use 'bpd' or 'fid'")
    if metric == "class_accuracy" and not model.num_classes:
        raise ConfigError("evaluate.primary_metric 'class_accuracy' needs a class-conditional model")
    if metric == "fid" and fid_factory is None:
        raise ConfigError("evaluate.primary_metric is 'fid' but FID cannot run: set evaluate.inception_weights "
                          "and install the 'fid' extra")
    if metric == "bpd" and ev.bpd_subset == 0:
        raise ConfigError("evaluate.primary_metric is 'bpd' but evaluate.bpd_subset is 0")
    if ev.use_gpu:
        import ray

        if ray.cluster_resources().get("GPU", 0) < 1:
            raise ConfigError("evaluate.use_gpu is true but the Ray cluster has no GPU")


# ------------------------------------------------------------------------------------------------ helpers
def _finite(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


def _load_raw_weights(raw_weights: str | Path | None) -> dict[str, torch.Tensor] | None:
    """Raw (non-EMA) weights from a safetensors file or a training checkpoint directory (model.safetensors)."""
    if raw_weights is None:
        return None
    from safetensors.torch import load_file

    p = Path(raw_weights)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        log.warning("raw weights not found at %s: only EMA grids are made", p)
        return None
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in load_file(str(p)).items()}


def job_name(weights: str, spec: SamplerSpec) -> str:
    """The name of one sampler job: ``ema:ddim/10``, ``raw:dpm_solver/20``."""
    return f"{weights}:{spec.sampler}/{spec.steps}"


def _sampler_specs(cfg: PipelineConfig) -> list[SamplerSpec]:
    """The gate sampler first, then the table's others (each (sampler, steps) once)."""
    ev = cfg.evaluate
    specs: dict[tuple[str, int], SamplerSpec] = {}
    for s in [ev.sampler, *ev.sampler_table]:
        specs.setdefault((s.sampler, s.steps), s)
    return list(specs.values())


# ------------------------------------------------------------------------------------------------ the stage
def evaluate(cfg: PipelineConfig, model_uri: str, data, *, run_id: str | None = None,
             raw_weights: str | Path | None = None,
             fid_extractor: T.FeatureExtractorFactory | None = None) -> EvalResult:
    """Evaluate ``model_uri`` on ``data`` (a DataResult) and log metrics + reports to MLflow.

    Metrics go to ``run_id`` when given (e.g. the training run), else to a new ``evaluate`` run nested under the
    model's training run. ``raw_weights`` (safetensors file or checkpoint dir) adds raw-weight grids.
    ``fid_extractor`` is a zero-argument factory of a feature extractor (uint8 [B, 3, H, W] -> [B, D], with a
    ``name`` attribute for its cache key) that replaces torch-fidelity's InceptionV3.
    """
    import mlflow

    from pipelines.model_io import load_model
    from pipelines.tracking import ensure_ray, setup_mlflow

    fid_factory, fid_skip = T.fid_factory(cfg, fid_extractor)
    exp_id = setup_mlflow(cfg)
    model = load_model(model_uri, tracking_uri=cfg.tracking_uri)
    ensure_ray(cfg)
    _check(cfg, model, data, fid_factory)
    name, version = model.info.get("name"), model.info.get("version")
    train_run = model.info.get("run_id") or model.card.get("training", {}).get("run_id")

    client = mlflow.MlflowClient()
    created = run_id is None
    if created:
        tags = {"stage": "evaluate", "model_uri": model_uri}
        if train_run:
            tags["mlflow.parentRunId"] = train_run
        label = f"{name}-v{version}" if name else "model"
        run_id = client.create_run(exp_id, run_name=f"evaluate-{label}", tags=tags).info.run_id
    try:
        result = _evaluate(cfg, model, model_uri, data, run_id, client, raw_weights, fid_factory, fid_skip,
                           name, version)
    except BaseException:
        if created:
            client.set_terminated(run_id, status="FAILED")
        raise
    if created:
        client.set_terminated(run_id, status="FINISHED")
    return result


def _evaluate(cfg, model, model_uri, data, run_id, client, raw_weights, fid_factory, fid_skip, name,
              version) -> EvalResult:
    ev = cfg.evaluate
    t_start = time.time()
    cache_dir = str(cfg.workspace.root.resolve() / "cache")
    data_json, ev_json = data.model_dump(mode="json"), ev.model_dump(mode="json")
    runner = TaskRunner(ev)
    skipped: dict[str, str] = {"fid": fid_skip} if fid_skip else {}

    # Reference classifier and real-data statistics (one task; the classifier is cached by data fingerprint).
    labelled = data.num_classes >= 2
    ref = None
    if labelled:
        ref = runner.run_one("reference", (T.reference_task, (data_json, cache_dir, ev_json, runner.threads)),
                             "evaluate: reference classifier")
        skipped.update(ref["notes"])
    else:
        skipped["embedded"] = "the dataset has no labels: no reference classifier, so no embedded Frechet " \
                              "distance, class accuracy or IS-style figure"

    # Samplers (the gate's first), bits/dim and raw-weight grids: independent jobs, keyed by name.
    specs = _sampler_specs(cfg)
    gate_job = job_name("ema", ev.sampler)
    model_arg = runner.put({"card": model.card, "state": {k: v.cpu() for k, v in model.unet.state_dict().items()}})
    ref_arg = runner.put({k: ref[k] for k in ("state", "config", "mu", "sigma")} if ref else None)
    jobs: dict[str, Job] = {}
    for s in specs:
        want_images = job_name("ema", s) == gate_job and fid_factory is not None  # FID needs the gate's images
        jobs[job_name("ema", s)] = (T.sampler_task, (model_arg, ref_arg, s.model_dump(), ev_json, ev.num_samples,
                                                     runner.threads, want_images))
    if ev.bpd_subset > 0:
        jobs["bpd"] = (T.bpd_task, (model_arg, data_json, ev_json, runner.threads))
    else:
        skipped["bpd"] = "evaluate.bpd_subset is 0"
    raw = _load_raw_weights(raw_weights)
    if raw is not None:
        raw_arg = runner.put({"card": model.card, "state": raw})
        for s in specs:
            jobs[job_name("raw", s)] = (T.sampler_task, (raw_arg, None, s.model_dump(), ev_json,
                                                         min(T.GRID_IMAGES, ev.num_samples), runner.threads))
    outs = runner.run(jobs, "evaluate: samplers and bits/dim")
    ema_outs = {k: v for k, v in outs.items() if k.startswith("ema:")}
    raw_outs = {k: v for k, v in outs.items() if k.startswith("raw:")}
    bpd_out = outs.get("bpd")

    # FID on the gate sampler's images.
    fid_out = None
    if fid_factory is not None:
        images = ema_outs[gate_job].pop("images_uint8")
        fid_out = runner.run_one("fid", (T.fid_task, (images, data_json, cache_dir, fid_factory, ev_json,
                                                      runner.threads)), "evaluate: FID")

    # Gate metrics: the gate sampler's scores, the reference numbers, bits/dim and FID.
    metrics = _gate_metrics(ref, ema_outs[gate_job], bpd_out, fid_out)
    if labelled and "class_accuracy" not in ema_outs[gate_job]:
        skipped["class_accuracy"] = "the model is unconditional"
    if not ev.sampler_table:
        skipped["sampler_table"] = "evaluate.sampler_table is empty"
    for k, v in skipped.items():
        log.warning("evaluate: %s skipped: %s", k, v)

    # Report: grids, table, report.json / report.md in a local directory, then logged as artifacts.
    out_dir = R.output_dir(cfg, name, version, run_id)
    ema_grids = R.write_grids(out_dir, ema_outs, "ema")
    raw_grids = R.write_grids(out_dir, raw_outs, "raw")
    rows = R.sampler_rows(ev, ema_outs, ema_grids)
    reference = {"data_fingerprint": data.fingerprint,
                 "classifier": ref["classifier"] if ref else None,
                 "num_held_out": ref["num_held_out"] if ref else None,
                 "fid": {k: v for k, v in (fid_out or {}).items() if k != "fid"} or None,
                 "bpd_split": bpd_out.get("bpd_split") if bpd_out else None,
                 "gate_sampler": ev.sampler.model_dump(), "num_samples": ev.num_samples, "seed": ev.seed,
                 "guidance_scale": ev.guidance_scale}
    report = {"model_uri": model_uri, "model_name": name, "model_version": version, "run_id": run_id,
              "metrics": metrics, "sampler_table": [r.model_dump() for r in rows], "skipped": skipped,
              "reference": reference, "evaluate_config": ev_json, "duration_s": time.time() - t_start}
    R.write_report(out_dir, report, R.report_md(model_uri, metrics, rows, skipped, reference, ev.sampler,
                                                ev.num_samples), rows)
    _log_to_mlflow(client, run_id, metrics, out_dir, rows)
    client.set_tag(run_id, "eval.model_uri", model_uri)
    if name and version:
        tag_version(client, name, version, metrics, reference, run_id)
    return EvalResult(model_uri=model_uri, model_name=name, model_version=version, run_id=run_id,
                      metrics=metrics, sampler_table=rows, report_json=str(out_dir / "report.json"),
                      report_md=str(out_dir / "report.md"), report_artifact_dir="evaluate",
                      grid_paths=[*ema_grids.values(), *raw_grids.values()], skipped=skipped, reference=reference)


def _gate_metrics(ref: dict | None, gate: dict[str, Any], bpd_out: dict | None, fid_out: dict | None) -> dict[str, float]:
    """The finite metrics of this evaluation, as logged, tagged and handed to the gate."""
    metrics: dict[str, Any] = dict(ref["metrics"]) if ref else {}
    metrics.update({k: gate[k] for k in GATE_KEYS if k in gate})
    if ref and metrics.get("frechet_distance_real"):
        metrics["frechet_ratio"] = metrics["frechet_distance"] / metrics["frechet_distance_real"]
    if bpd_out:
        metrics.update({k: v for k, v in bpd_out.items() if k != "bpd_split"})
    if fid_out:
        metrics["fid"] = fid_out["fid"]
    return _finite(metrics)


def _log_to_mlflow(client, run_id: str, metrics: dict[str, float], out_dir: Path, rows: list[R.SamplerRow]) -> None:
    """Metrics as ``eval/<name>``, the report directory under ``evaluate/``, the sampler table as an MLflow table."""
    import mlflow

    from pipelines.tracking import mlflow_metrics

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=mlflow_metrics({METRIC_PREFIX + k: v for k, v in metrics.items()}, 0, now))
    client.log_artifacts(run_id, str(out_dir), artifact_path="evaluate")
    if rows:
        cols = ["sampler", "steps", "num_samples", "frechet_distance", "class_accuracy", "inception_score",
                "seconds_per_image"]
        table = {c: [getattr(r, c) for r in rows] for c in cols}
        # log_table appends to an existing table of the same name: the timestamp tells evaluations apart
        table["evaluated_at"] = [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1000))] * len(rows)
        mlflow.log_table(table, artifact_file="evaluate/sampler_table.json", run_id=run_id)
