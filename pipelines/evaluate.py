"""Evaluation stage and the registry promotion gate.

``evaluate(cfg, model_uri, data)`` measures a registered model on Ray tasks and logs everything to MLflow:

- the embedded metric: a small reference classifier trained on the train split (cached on disk by data
  fingerprint) gives penultimate-layer features for the Frechet distance between generated and held-out real
  images, the accuracy of class-conditional samples against their requested labels and an Inception-Score-style
  figure; the real-vs-real baseline (a train subset of the same size vs the test split) makes them readable;
- NLL in bits/dim on a held-out subset (``GaussianDiffusion.calc_bpd_loop``);
- FID with InceptionV3 pool3 features, only when ``evaluate.inception_weights`` is set and torch-fidelity (the
  optional ``fid`` extra) imports, or with an injected feature extractor; otherwise skipped with a message;
- one sample grid per sampler (EMA weights; raw weights too when given) and the sampler table (quality and
  seconds per image per sampler), as an MLflow table plus ``report.json`` / ``report.md`` artifacts.

Work units (reference classifier, one sampler row, bits/dim, FID) are Ray tasks with ``evaluate.cpus_per_task``
CPUs and one GPU each when ``evaluate.use_gpu``; at most ``evaluate.concurrency`` run at once.

``promote(cfg, model_name, version, metrics)`` is the gate: the version gets ``registry.champion_alias`` if there
is no champion or its primary metric beats the champion's by ``evaluate.promote_margin`` (relative); otherwise it
is tagged ``rejected`` with the reason. Decision and both numbers go to the version's tags and description.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from pipelines import metrics as M
from pipelines.config import ConfigError, EvaluateConfig, PipelineConfig, SamplerSpec

log = logging.getLogger("pipelines.evaluate")

# Which way each gate-able metric improves. The gate refuses anything else by name.
LOWER_IS_BETTER = ("frechet_distance", "frechet_ratio", "fid", "bpd")
HIGHER_IS_BETTER = ("class_accuracy", "inception_score")
GRID_IMAGES = 64
METRIC_PREFIX = "eval/"  # MLflow metric names: eval/frechet_distance, ...
TAG_PREFIX = "eval."  # model-version tags: eval.frechet_distance, ...
REJECTED_TAG = "rejected"

FeatureExtractorFactory = Callable[[], Callable[[torch.Tensor], torch.Tensor]]


class SamplerRow(BaseModel):
    """One row of the sampler table (quality on the embedded metric, wall-clock cost)."""

    sampler: str
    steps: int
    num_samples: int
    seconds_per_image: float
    frechet_distance: float | None = None
    class_accuracy: float | None = None
    inception_score: float | None = None
    grid_path: str | None = None


class EvalResult(BaseModel):
    model_uri: str
    model_name: str | None = None
    model_version: str | None = None
    run_id: str
    metrics: dict[str, float]
    sampler_table: list[SamplerRow]
    report_json: str
    report_md: str
    report_artifact_dir: str  # artifact path of the reports inside the run
    grid_paths: list[str]
    skipped: dict[str, str]
    reference: dict[str, Any]


class PromoteResult(BaseModel):
    model_name: str
    version: str
    decision: Literal["promoted", "rejected", "already_champion"]
    promoted: bool
    reason: str
    metric: str
    higher_is_better: bool
    value: float | None
    champion_version: str | None
    champion_value: float | None
    margin: float
    alias: str


def metric_direction(name: str) -> bool:
    """True when higher values of metric ``name`` are better; ConfigError for metrics the gate does not know."""
    if name in HIGHER_IS_BETTER:
        return True
    if name in LOWER_IS_BETTER:
        return False
    raise ConfigError(f"evaluate.primary_metric: unknown metric '{name}'; accepted: lower is better "
                      f"{', '.join(LOWER_IS_BETTER)}; higher is better {', '.join(HIGHER_IS_BETTER)}")


# ------------------------------------------------------------------------------------------------ FID network
class TorchFidelityInception(nn.Module):
    """InceptionV3 pool3 (2048-d) features of uint8 [B, 3, H, W] images via torch-fidelity's FID network
    (resized to 299 inside), loaded from a local weights file: nothing is downloaded."""

    def __init__(self, weights_path: str):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        from pipelines.data.sources import sha256_file

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(weights_path))
        self.name = f"torch-fidelity-inception-v3-compat-{sha256_file(Path(weights_path))[:16]}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0].reshape(images.shape[0], -1)


def _fid_factory(cfg: PipelineConfig, injected: FeatureExtractorFactory | None) -> tuple[Any, str | None]:
    """(extractor factory or None, reason FID is skipped or None). ConfigError for a missing weights file."""
    if injected is not None:
        return injected, None
    path = cfg.evaluate.inception_weights
    if not path:
        return None, "evaluate.inception_weights is not set (FID needs a local InceptionV3 weights file)"
    if not Path(path).is_file():
        raise ConfigError(f"evaluate.inception_weights: file not found: {path}")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return None, ("evaluate.inception_weights is set but torch-fidelity is not installed; "
                      "install the optional extra: pip install 'diffusion-pipeline[fid]'")
    return functools.partial(TorchFidelityInception, str(path)), None


# ------------------------------------------------------------------------------------------------ task bodies
def _device(ev: EvaluateConfig) -> torch.device:
    return torch.device("cuda" if ev.use_gpu and torch.cuda.is_available() else "cpu")


def _build_sampler(payload: dict[str, Any], device: torch.device):
    from pipelines.model_io import sampler_from_state

    return sampler_from_state(payload["card"], payload["state"], device)


def _held_out(data) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The test split, or the train split (flag False) when the dataset has no test split."""
    from pipelines.data import load_split_tensors

    x, y = load_split_tensors(data, "test")
    if len(x) >= 2:
        return x, y, True
    x, y = load_split_tensors(data, "train")
    return x, y, False


def reference_task(data_json: dict, cache_dir: str, ev_json: dict, threads: int) -> dict[str, Any]:
    """Reference classifier (cached) + real-data statistics: held-out feature mean/covariance, the classifier's
    held-out accuracy, the real Inception-Score-style figure and the real-vs-real Frechet baseline."""
    from pipelines.data import DataResult, load_split_tensors

    torch.set_num_threads(threads)
    data = DataResult.model_validate(data_json)
    ev = EvaluateConfig.model_validate(ev_json)
    device = _device(ev)
    x_tr, y_tr = load_split_tensors(data, "train")
    x_ho, y_ho, has_test = _held_out(data)
    net, info = M.load_or_train_classifier(
        Path(cache_dir), data.fingerprint, x_tr, y_tr, num_classes=data.num_classes, steps=ev.classifier_steps,
        image_size=data.image_size, channels=data.channels, seed=ev.seed, device=device)
    f_ho, p_ho = net.embed(x_ho)
    mu, sigma = M.feature_statistics(f_ho)
    metrics: dict[str, float] = {"inception_score_real": M.inception_score(p_ho)}
    notes: dict[str, str] = {}
    if has_test:
        metrics["classifier_test_accuracy"] = M.accuracy(p_ho, y_ho)
        # Same number of real images as generated ones, so the baseline carries the same small-sample bias.
        n = min(ev.num_samples, len(x_tr))
        idx = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(ev.seed))[:n]
        f_tr, _ = net.embed(x_tr[idx])
        metrics["frechet_distance_real"] = M.frechet_distance(*M.feature_statistics(f_tr), mu, sigma)
    else:
        notes["real_baseline"] = "the dataset has no test split: samples are compared with the train split and " \
                                 "the real-vs-real baseline is not computed"
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return {"state": state, "config": net.config, "classifier": info, "mu": mu, "sigma": sigma,
            "metrics": metrics, "notes": notes, "num_held_out": len(x_ho), "num_train": len(x_tr)}


def sampler_task(model: dict, ref: dict | None, spec_json: dict, ev_json: dict, num_samples: int,
                 threads: int, want_images: bool = False) -> dict[str, Any]:
    """Draw ``num_samples`` images with one sampler (labels 0..K-1 cycled), time it, and score them with the
    reference classifier (when ``ref`` is given). Returns metrics, seconds/image and a PNG grid."""
    from pipelines.images import make_grid, png_bytes, to_uint8

    torch.set_num_threads(threads)
    ev = EvaluateConfig.model_validate(ev_json)
    spec = SamplerSpec.model_validate(spec_json)
    device = _device(ev)
    sampler = _build_sampler(model, device)
    if ev.compile:  # evaluate.compile: compiled before the timer starts, warm-up at the batch sizes used
        from diffusion_core.models import CPU_WARMUP_BATCH_SIZES, compile_unet

        sampler.unet = compile_unet(sampler.unet, warmup_batch_sizes=CPU_WARMUP_BATCH_SIZES)
    labels = sampler.labels_for(num_samples, None)
    gen = torch.Generator().manual_seed(ev.seed)
    chunks = []
    t0 = time.perf_counter()
    for i in range(0, num_samples, ev.sample_batch_size):
        b = min(ev.sample_batch_size, num_samples - i)
        lab = labels[i : i + b].tolist() if labels is not None else None
        x = sampler.sample(b, sampler=spec.sampler, steps=spec.steps, guidance_scale=ev.guidance_scale,
                           class_labels=lab, generator=gen)
        chunks.append(x.float().cpu())  # .cpu() waits for the GPU, so the timing is complete
    seconds = time.perf_counter() - t0
    x = torch.cat(chunks)
    out: dict[str, Any] = {"sampler": spec.sampler, "steps": spec.steps, "num_samples": num_samples,
                           "seconds_per_image": seconds / num_samples,
                           "grid_png": png_bytes(make_grid(x[:GRID_IMAGES]))}
    if ref is not None:
        net = M.ReferenceClassifier(**ref["config"])
        net.load_state_dict(ref["state"])
        f, p = net.to(device).embed(x)
        out["frechet_distance"] = M.frechet_distance(*M.feature_statistics(f), ref["mu"], ref["sigma"])
        out["inception_score"] = M.inception_score(p)
        if labels is not None:
            out["class_accuracy"] = M.accuracy(p, labels)
    if want_images:
        out["images_uint8"] = to_uint8(x)
    return out


def bpd_task(model: dict, data_json: dict, ev_json: dict, threads: int) -> dict[str, Any]:
    """Mean NLL upper bound in bits/dim over ``evaluate.bpd_subset`` held-out images (Ho et al. 2020, Eq. 5;
    conditional on the true label for a class-conditional model)."""
    from pipelines.data import DataResult, load_split_tensors

    torch.set_num_threads(threads)
    data = DataResult.model_validate(data_json)
    ev = EvaluateConfig.model_validate(ev_json)
    device = _device(ev)
    sampler = _build_sampler(model, device)
    x, y = load_split_tensors(data, "test", limit=ev.bpd_subset)
    split = "test"
    if len(x) == 0:
        x, y = load_split_tensors(data, "train", limit=ev.bpd_subset)
        split = "train"
    gen = torch.Generator().manual_seed(ev.seed)
    totals, priors = [], []
    for i in range(0, len(x), ev.sample_batch_size):
        xb = x[i : i + ev.sample_batch_size].to(device)
        kwargs = {"y": y[i : i + len(xb)].to(device)} if sampler.num_classes else {}
        out = sampler.diffusion.calc_bpd_loop(sampler.unet, xb, clip_denoised=True, model_kwargs=kwargs,
                                              generator=gen)
        totals.append(out["total_bpd"].float().cpu())
        priors.append(out["prior_bpd"].float().cpu())
    total, prior = torch.cat(totals), torch.cat(priors)
    return {"bpd": float(total.mean()), "bpd_prior": float(prior.mean()), "bpd_num_images": len(total),
            "bpd_split": split}


def _uint8_nchw3(images_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> uint8 [N, 3, H, W] (grayscale repeated), what Inception feature extractors take."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


@torch.no_grad()
def _extract(extractor, images: torch.Tensor, device: torch.device, batch: int = 100) -> torch.Tensor:
    return torch.cat([extractor(images[i : i + batch].to(device)).float().cpu()
                      for i in range(0, len(images), batch)])


def fid_task(images_nhwc: np.ndarray, data_json: dict, cache_dir: str, factory, ev_json: dict,
             threads: int) -> dict[str, Any]:
    """FID of generated images against the train split's statistics in the extractor's feature space
    (Heusel et al. 2017); the reference statistics are cached per (data fingerprint, extractor)."""
    from pipelines.data import DataResult, load_split_tensors
    from pipelines.images import to_uint8

    torch.set_num_threads(threads)
    data = DataResult.model_validate(data_json)
    ev = EvaluateConfig.model_validate(ev_json)
    device = _device(ev)
    extractor = factory()
    if isinstance(extractor, nn.Module):
        extractor = extractor.to(device).eval()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(getattr(extractor, "name", type(extractor).__name__)))
    path = Path(cache_dir) / f"fid_reference-{data.fingerprint}-{name}.npz"
    cached = path.is_file()
    if cached:
        with np.load(path) as z:
            mu_r, sigma_r = z["mu"], z["sigma"]
    else:
        x_tr, _ = load_split_tensors(data, "train")
        mu_r, sigma_r = M.feature_statistics(_extract(extractor, _uint8_nchw3(to_uint8(x_tr)), device))
        buf = io.BytesIO()
        np.savez(buf, mu=mu_r, sigma=sigma_r)
        M.atomic_write_bytes(path, buf.getvalue())
    mu_g, sigma_g = M.feature_statistics(_extract(extractor, _uint8_nchw3(images_nhwc), device))
    return {"fid": M.frechet_distance(mu_g, sigma_g, mu_r, sigma_r), "fid_reference": str(path),
            "fid_reference_cached": cached, "fid_extractor": name}


# ------------------------------------------------------------------------------------------------ Ray plumbing
class _Runner:
    """Runs task bodies as Ray tasks (``limit`` in flight) or, inside a task that already holds the GPU the
    sub-tasks would need, in this process (a blocked task keeps its GPU, so sub-tasks could never start)."""

    def __init__(self, ev: EvaluateConfig):
        import ray

        self.ray = ray
        self.limit = ev.concurrency
        self.options = {"num_cpus": ev.cpus_per_task, "num_gpus": 1 if ev.use_gpu else 0, "max_retries": 1}
        in_worker = ray.get_runtime_context().worker.mode == ray.WORKER_MODE  # inside a task/actor
        self.inline = bool(ev.use_gpu and in_worker and ray.get_gpu_ids())
        self.threads = max(1, int(ev.cpus_per_task))

    def run(self, jobs: list[tuple[Callable, tuple]], desc: str) -> list[Any]:
        """Results of ``fn(*args)`` for each job, in order; a progress bar counts finished jobs."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=desc, unit="task", leave=False)
        if self.inline:
            results_inline = []
            for fn, args in jobs:
                results_inline.append(fn(*args))
                bar.update()
            bar.close()
            return results_inline
        results: dict[int, Any] = {}
        pending: dict[Any, int] = {}
        queue = list(enumerate(jobs))
        while queue or pending:
            while queue and len(pending) < self.limit:
                i, (fn, args) = queue.pop(0)
                pending[self.ray.remote(fn).options(**self.options).remote(*args)] = i
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = self.ray.get(ref)
                bar.update()
        bar.close()
        return [results[i] for i in range(len(jobs))]


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
    T = model.num_timesteps
    specs = [("evaluate.sampler", ev.sampler)] + [(f"evaluate.sampler_table[{i}]", s)
                                                   for i, s in enumerate(ev.sampler_table)]
    for where, s in specs:
        if s.steps > T:
            raise ConfigError(f"{where}.steps: {s.steps} exceeds the model's {T} diffusion steps (1..{T})")
    if ev.guidance_scale != 1.0 and not model.num_classes:
        raise ConfigError("evaluate.guidance_scale: classifier-free guidance needs a class-conditional model")
    metric = ev.primary_metric
    metric_direction(metric)
    needs_classifier = metric in ("frechet_distance", "frechet_ratio", "class_accuracy", "inception_score")
    if needs_classifier and data.num_classes < 2:
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


# ------------------------------------------------------------------------------------------------ the stage
def _finite(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _markdown_table(rows: list[SamplerRow]) -> str:
    lines = ["| sampler | steps | Frechet distance (embedded) | class accuracy | IS-style | s / image |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.sampler} | {r.steps} | {_fmt(r.frechet_distance)} | {_fmt(r.class_accuracy)} | "
                     f"{_fmt(r.inception_score)} | {_fmt(r.seconds_per_image)} |")
    return "\n".join(lines) + "\n"


def _report_md(uri: str, metrics: dict[str, float], rows: list[SamplerRow], skipped: dict[str, str],
               reference: dict[str, Any], gate: SamplerSpec, num_samples: int) -> str:
    parts = [f"# Evaluation of `{uri}`\n",
             f"Gate sampler: {gate.sampler} {gate.steps} steps, {num_samples} samples (EMA weights).\n",
             "| metric | value |", "|---|---:|"]
    parts += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    parts.append("\nReading the embedded numbers: `frechet_distance_real` is the real-vs-real baseline (a train "
                 "subset of the same size vs the held-out split); `frechet_ratio` = model / baseline.\n")
    if rows:
        parts += [f"## Sampler table ({rows[0].num_samples} samples per row)\n", _markdown_table(rows)]
    if skipped:
        parts += ["## Skipped / notes\n"] + [f"- **{k}**: {v}" for k, v in skipped.items()]
    parts.append(f"\nReference classifier: `{reference.get('classifier', {}).get('key')}` "
                 f"(data fingerprint `{reference.get('data_fingerprint')}`).\n")
    return "\n".join(parts) + "\n"


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


def evaluate(cfg: PipelineConfig, model_uri: str, data, *, run_id: str | None = None,
             raw_weights: str | Path | None = None,
             fid_extractor: FeatureExtractorFactory | None = None) -> EvalResult:
    """Evaluate ``model_uri`` on ``data`` (a DataResult) and log metrics + reports to MLflow.

    Metrics go to ``run_id`` when given (e.g. the training run), else to a new ``evaluate`` run nested under the
    model's training run. ``raw_weights`` (safetensors file or checkpoint dir) adds raw-weight grids.
    ``fid_extractor`` is a zero-argument factory of a feature extractor (uint8 [B, 3, H, W] -> [B, D], with a
    ``name`` attribute for its cache key) that replaces torch-fidelity's InceptionV3.
    """
    import mlflow

    from pipelines.model_io import load_model
    from pipelines.tracking import ensure_ray, setup_mlflow

    ev = cfg.evaluate
    metric_direction(ev.primary_metric)
    fid_factory, fid_skip = _fid_factory(cfg, fid_extractor)
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
    import mlflow
    import ray

    from pipelines.tracking import mlflow_metrics

    ev = cfg.evaluate
    t_start = time.time()
    cache_dir = str(cfg.workspace.root.resolve() / "cache")
    data_json, ev_json = data.model_dump(mode="json"), ev.model_dump(mode="json")
    runner = _Runner(ev)
    skipped: dict[str, str] = {}
    if fid_skip:
        skipped["fid"] = fid_skip

    # 1. reference classifier + real statistics (one task; the classifier is cached by data fingerprint)
    labelled = data.num_classes >= 2
    ref = None
    if labelled:
        ref = runner.run([(reference_task, (data_json, cache_dir, ev_json, runner.threads))],
                         "evaluate: reference classifier")[0]
        skipped.update(ref["notes"])
    else:
        skipped["embedded"] = "the dataset has no labels: no reference classifier, so no embedded Frechet " \
                              "distance, class accuracy or IS-style figure"
    ref_slim = {k: ref[k] for k in ("state", "config", "mu", "sigma")} if ref else None

    # 2. samplers (gate first), bits/dim, raw-weight grids: independent tasks
    model_payload = {"card": model.card, "state": {k: v.cpu() for k, v in model.unet.state_dict().items()}}
    if not runner.inline:
        model_payload, ref_arg = ray.put(model_payload), ray.put(ref_slim)
    else:
        ref_arg = ref_slim
    gate = ev.sampler
    specs = [gate] + [s for s in ev.sampler_table if (s.sampler, s.steps) != (gate.sampler, gate.steps)]
    jobs: list[tuple[Callable, tuple]] = []
    for i, s in enumerate(specs):
        jobs.append((sampler_task, (model_payload, ref_arg, s.model_dump(), ev_json, ev.num_samples,
                                    runner.threads, i == 0 and fid_factory is not None)))
    if ev.bpd_subset > 0:
        jobs.append((bpd_task, (model_payload, data_json, ev_json, runner.threads)))
    else:
        skipped["bpd"] = "evaluate.bpd_subset is 0"
    raw = _load_raw_weights(raw_weights)
    if raw is not None:
        raw_payload = {"card": model.card, "state": raw}
        for s in specs:
            jobs.append((sampler_task, (raw_payload, None, s.model_dump(), ev_json,
                                        min(GRID_IMAGES, ev.num_samples), runner.threads)))
    outs = runner.run(jobs, "evaluate: samplers and bits/dim")
    rows_out = outs[: len(specs)]
    bpd_out = outs[len(specs)] if ev.bpd_subset > 0 else None
    raw_out = outs[len(specs) + (1 if ev.bpd_subset > 0 else 0):]

    # 3. FID on the gate sampler's images
    fid_out = None
    if fid_factory is not None:
        images = rows_out[0].pop("images_uint8")
        fid_out = runner.run([(fid_task, (images, data_json, cache_dir, fid_factory, ev_json, runner.threads))],
                             "evaluate: FID")[0]

    # metrics of the gate sampler + reference numbers
    g = rows_out[0]
    metrics: dict[str, Any] = dict(ref["metrics"]) if ref else {}
    for k in ("frechet_distance", "class_accuracy", "inception_score", "seconds_per_image"):
        if k in g:
            metrics[k] = g[k]
    if ref and metrics.get("frechet_distance_real"):
        metrics["frechet_ratio"] = metrics["frechet_distance"] / metrics["frechet_distance_real"]
    if labelled and "class_accuracy" not in g:
        skipped["class_accuracy"] = "the model is unconditional"
    if bpd_out:
        metrics.update({k: v for k, v in bpd_out.items() if k != "bpd_split"})
    if fid_out:
        metrics["fid"] = fid_out["fid"]
    metrics = _finite(metrics)
    for k, v in skipped.items():
        log.warning("evaluate: %s skipped: %s", k, v)

    # reports: grids, table, report.json / report.md in a local directory, then logged as artifacts
    slug = f"{name}-v{version}" if name and version else run_id
    out_dir = cfg.workspace.outputs / "evaluate" / re.sub(r"[^A-Za-z0-9_.-]+", "_", slug)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    grid_paths: list[str] = []
    table_keys = {(s.sampler, s.steps) for s in ev.sampler_table}
    rows: list[SamplerRow] = []
    for o in rows_out:
        p = out_dir / "samples" / f"{o['sampler']}{o['steps']}_ema.png"
        p.write_bytes(o.pop("grid_png"))
        grid_paths.append(str(p))
        if (o["sampler"], o["steps"]) in table_keys:
            rows.append(SamplerRow(**{k: o.get(k) for k in SamplerRow.model_fields if k != "grid_path"},
                                   grid_path=str(p)))
    order = {(s.sampler, s.steps): i for i, s in enumerate(ev.sampler_table)}
    rows.sort(key=lambda r: order[(r.sampler, r.steps)])
    for o in raw_out:
        p = out_dir / "samples" / f"{o['sampler']}{o['steps']}_raw.png"
        p.write_bytes(o["grid_png"])
        grid_paths.append(str(p))
    if not ev.sampler_table:
        skipped["sampler_table"] = "evaluate.sampler_table is empty"

    reference = {"data_fingerprint": data.fingerprint,
                 "classifier": ref["classifier"] if ref else None,
                 "num_held_out": ref["num_held_out"] if ref else None,
                 "fid": {k: v for k, v in (fid_out or {}).items() if k != "fid"} or None,
                 "bpd_split": bpd_out.get("bpd_split") if bpd_out else None,
                 "gate_sampler": gate.model_dump(), "num_samples": ev.num_samples, "seed": ev.seed,
                 "guidance_scale": ev.guidance_scale}
    report = {"model_uri": model_uri, "model_name": name, "model_version": version, "run_id": run_id,
              "metrics": metrics, "sampler_table": [r.model_dump() for r in rows], "skipped": skipped,
              "reference": reference, "evaluate_config": ev_json, "duration_s": time.time() - t_start}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(_report_md(model_uri, metrics, rows, skipped, reference, gate,
                                                  ev.num_samples))
    if rows:
        (out_dir / "sampler_table.md").write_text(_markdown_table(rows))

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
    client.set_tag(run_id, "eval.model_uri", model_uri)
    if name and version:
        _tag_version(client, name, version, metrics, reference, run_id)
    return EvalResult(model_uri=model_uri, model_name=name, model_version=version, run_id=run_id,
                      metrics=metrics, sampler_table=rows, report_json=str(out_dir / "report.json"),
                      report_md=str(out_dir / "report.md"), report_artifact_dir="evaluate",
                      grid_paths=grid_paths, skipped=skipped, reference=reference)


def _comparability(reference: dict[str, Any]) -> str:
    """What has to match for two versions' metrics to be comparable (recorded on each version)."""
    clf = (reference.get("classifier") or {}).get("key")
    gate = reference["gate_sampler"]
    return (f"classifier={clf};data={reference['data_fingerprint']};sampler={gate['sampler']}/{gate['steps']};"
            f"n={reference['num_samples']};seed={reference['seed']};guidance={reference['guidance_scale']}")


def _tag_version(client, name: str, version: str, metrics: dict[str, float], reference: dict[str, Any],
                 run_id: str) -> None:
    for k, v in metrics.items():
        client.set_model_version_tag(name, version, TAG_PREFIX + k, repr(float(v)))
    client.set_model_version_tag(name, version, TAG_PREFIX + "setup", _comparability(reference))
    client.set_model_version_tag(name, version, TAG_PREFIX + "run_id", run_id)


# ------------------------------------------------------------------------------------------------ the gate
def _champion(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise


def _as_float(s: str | None) -> float | None:
    try:
        return float(s) if s is not None else None
    except ValueError:
        return None


def promote(cfg: PipelineConfig, model_name: str, version: str | int, metrics: dict[str, float]) -> PromoteResult:
    """Give ``version`` the champion alias if there is no champion or its ``evaluate.primary_metric`` beats the
    champion's by the relative ``evaluate.promote_margin``; otherwise tag it ``rejected`` with the reason.

    Lower-is-better metrics need ``new < champ - margin * |champ|``; higher-is-better ones
    ``new > champ + margin * |champ|`` (ties are rejected). The champion's number is its ``eval.<metric>`` tag,
    written by :func:`evaluate` (evaluate the champion again if it lacks one).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import setup_mlflow

    ev, alias = cfg.evaluate, cfg.registry.champion_alias
    metric, margin = ev.primary_metric, ev.promote_margin
    higher = metric_direction(metric)
    version = str(version)
    setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version(model_name, version)
    except MlflowException as e:
        raise ValueError(f"model version {model_name}/{version} not found in the registry at "
                         f"{cfg.tracking_uri}: {e.message}") from None
    if metric not in metrics:
        raise ValueError(f"evaluate.primary_metric is '{metric}' but the metrics have no such entry "
                         f"(have: {', '.join(sorted(metrics)) or 'none'})")
    value = float(metrics[metric])
    champ = _champion(client, model_name, alias)
    champ_version = str(champ.version) if champ else None
    champ_value = _as_float((champ.tags or {}).get(TAG_PREFIX + metric)) if champ else None
    better = "higher" if higher else "lower"

    note = ""
    if champ and champ_version != version:
        mine, theirs = (mv.tags or {}).get(TAG_PREFIX + "setup"), (champ.tags or {}).get(TAG_PREFIX + "setup")
        if mine and theirs and mine != theirs:
            note = f" (note: evaluated under different setups: this version '{mine}', champion '{theirs}')"

    if champ is None:
        decision, reason = "promoted", f"no current '{alias}': the first evaluated version is promoted " \
                                       f"({metric} {value:.6g})"
    elif champ_version == version:
        decision, reason = "already_champion", f"version {version} already holds '{alias}'"
    elif not math.isfinite(value):
        decision, reason = "rejected", f"{metric} is not finite ({value})"
    elif champ_value is None:
        decision = "rejected"
        reason = (f"champion v{champ_version} has no recorded {metric}: evaluate it (diffusion-pipeline "
                  f"evaluate --model-uri models:/{model_name}@{alias}) and run the gate again")
    else:
        bound = champ_value + margin * abs(champ_value) if higher else champ_value - margin * abs(champ_value)
        wins = value > bound if higher else value < bound
        verdict = "beats" if wins else "does not beat"
        reason = (f"{metric} {value:.6g} {verdict} champion v{champ_version}'s {champ_value:.6g} by the "
                  f"required margin {margin:.1%} ({better} is better; needed {'>' if higher else '<'} "
                  f"{bound:.6g}){note}")
        decision = "promoted" if wins else "rejected"

    tags = {"promotion.decision": decision, "promotion.reason": reason, "promotion.metric": metric,
            "promotion.value": repr(value), "promotion.champion_version": champ_version or "",
            "promotion.champion_value": "" if champ_value is None else repr(champ_value),
            "promotion.margin": repr(margin), "promotion.higher_is_better": str(higher).lower(),
            TAG_PREFIX + metric: repr(value)}
    for k, v in tags.items():
        client.set_model_version_tag(model_name, version, k, v)
    if decision == "promoted":
        client.set_registered_model_alias(model_name, alias, version)
        if REJECTED_TAG in (mv.tags or {}):
            client.delete_model_version_tag(model_name, version, REJECTED_TAG)
        if champ is not None:
            client.set_model_version_tag(model_name, champ_version, "superseded_by", version)
    elif decision == "rejected":
        client.set_model_version_tag(model_name, version, REJECTED_TAG, reason)
    champ_txt = "none" if champ is None else f"v{champ_version} = {champ_value if champ_value is not None else 'n/a'}"
    line = (f"[promotion gate] {decision}: {metric} = {value:.6g} ({better} is better), champion {champ_txt}, "
            f"margin {margin:.1%}. {reason}")
    desc = (mv.description or "").rstrip()
    client.update_model_version(model_name, version, description=f"{desc}\n{line}".strip())
    log.info("promotion gate for %s v%s: %s", model_name, version, line)
    return PromoteResult(model_name=model_name, version=version, decision=decision,
                         promoted=decision in ("promoted", "already_champion"), reason=reason, metric=metric,
                         higher_is_better=higher, value=value, champion_version=champ_version,
                         champion_value=champ_value, margin=margin, alias=alias)
