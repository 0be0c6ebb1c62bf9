"""Evaluation work units, each the body of one Ray task (or run inline, see :mod:`pipelines.evaluate.runner`).

Every body takes plain, picklable arguments (JSON dumps of the configs, state dicts) and returns a plain dict:

- :func:`reference_task`: the reference classifier (cached by data fingerprint) and the real-data statistics;
- :func:`sampler_task`: one sampler's images, seconds per image, and their scores under the classifier;
- :func:`bpd_task`: bits/dim on held-out images;
- :func:`fid_task`: FID of the gate sampler's images in an InceptionV3 (or injected) feature space.

Held-out data (:func:`load_held_out`): the test split when it holds at least ``MIN_HELD_OUT`` (2) images, the
fewest a covariance needs; otherwise the train split, and the report says so.
"""

from __future__ import annotations

import functools
import io
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines import metrics as M
from pipelines.config import ConfigError, EvaluateConfig, PipelineConfig, SamplerSpec

GRID_IMAGES = 64  # images in each sample grid
MIN_HELD_OUT = 2  # the test split is the held-out set when it has at least this many images

FeatureExtractorFactory = Callable[[], Callable[[torch.Tensor], torch.Tensor]]


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


def fid_factory(cfg: PipelineConfig, injected: FeatureExtractorFactory | None) -> tuple[Any, str | None]:
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


def load_held_out(data, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images, labels, split) of the held-out images: the test split when it holds at least
    :data:`MIN_HELD_OUT` images, else the train split (a dataset prepared with ``test_fraction: 0``).
    The one rule for every task that needs held-out data (reference statistics, bits/dim)."""
    from pipelines.data import load_split_tensors

    probe = None if limit is None else max(limit, MIN_HELD_OUT)
    x, y = load_split_tensors(data, "test", limit=probe)
    split = "test"
    if len(x) < MIN_HELD_OUT:
        x, y = load_split_tensors(data, "train", limit=limit)
        split = "train"
    return (x, y, split) if limit is None else (x[:limit], y[:limit], split)


def reference_task(data_json: dict, cache_dir: str, ev_json: dict, threads: int) -> dict[str, Any]:
    """Reference classifier (cached) + real-data statistics: held-out feature mean/covariance, the classifier's
    held-out accuracy, the real Inception-Score-style figure and the real-vs-real Frechet baseline."""
    from pipelines.data import DataResult, load_split_tensors

    torch.set_num_threads(threads)
    data = DataResult.model_validate(data_json)
    ev = EvaluateConfig.model_validate(ev_json)
    device = _device(ev)
    x_tr, y_tr = load_split_tensors(data, "train")
    x_ho, y_ho, held_out_split = load_held_out(data)
    has_test = held_out_split == "test"
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
            "metrics": metrics, "notes": notes, "num_held_out": len(x_ho), "held_out_split": held_out_split,
            "num_train": len(x_tr)}


def sampler_task(model: dict, ref: dict | None, spec_json: dict, ev_json: dict, num_samples: int,
                 threads: int, want_images: bool = False) -> dict[str, Any]:
    """Draw ``num_samples`` images with one sampler (labels 0..K-1 cycled), time it, and score them with the
    reference classifier (when ``ref`` is given). Returns metrics, seconds/image and a PNG grid."""
    from pipelines.images import READABLE_WIDTH, make_grid, png_bytes, to_uint8

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
                           "grid_png": png_bytes(make_grid(x[:GRID_IMAGES], min_width=READABLE_WIDTH))}
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
    from pipelines.data import DataResult

    torch.set_num_threads(threads)
    data = DataResult.model_validate(data_json)
    ev = EvaluateConfig.model_validate(ev_json)
    device = _device(ev)
    sampler = _build_sampler(model, device)
    x, y, split = load_held_out(data, limit=ev.bpd_subset)
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
