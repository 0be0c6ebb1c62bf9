"""Guidance: classifier-free guidance as a model wrapper, classifier guidance cond_fn, dynamic thresholding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ClassifierFreeGuidance", "class_labels", "classifier_cond_fn", "conditioned_model", "dynamic_threshold",
           "make_dynamic_threshold"]


class ClassifierFreeGuidance(nn.Module):
    """Wrap a class-conditional model: out = uncond + s * (cond - uncond) on the first `eps_channels` channels
    (Ho & Salimans 2022, Eq. 6), the conditional pass's remaining (variance) channels unchanged.

    Both passes run as one batch of 2B (cond rows first, then the same rows with `null_label`).
    `guidance_scale` is a float or a tensor [B] (one scale per row); a float s = 1 runs only the conditional
    pass, and y=None passes straight through to the model without labels.
    """

    def __init__(self, model: Callable, guidance_scale: float | torch.Tensor, null_label: int,
                 eps_channels: int | None = None):
        super().__init__()
        self.model = model
        self.guidance_scale = guidance_scale
        self.null_label = int(null_label)
        self.eps_channels = eps_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        s = self.guidance_scale
        if y is None:
            return self.model(x, t, **kwargs)
        if not isinstance(s, torch.Tensor) and float(s) == 1.0:
            return self.model(x, t, y=y, **kwargs)
        y_null = torch.full_like(y, self.null_label)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, y_null]), **kwargs)
        cond, uncond = out.chunk(2, dim=0)
        e = x.shape[1] if self.eps_channels is None else int(self.eps_channels)
        if isinstance(s, torch.Tensor):
            s = s.to(device=out.device, dtype=out.dtype).reshape(-1, *([1] * (out.ndim - 1)))
        # Ho & Salimans 2022, Eq. 6 written as uncond + s (cond - uncond)
        guided = uncond[:, :e] + s * (cond[:, :e] - uncond[:, :e])
        return torch.cat([guided, cond[:, e:]], dim=1)


def class_labels(num_samples: int, num_classes: int, given: Sequence[int] | None = None) -> torch.Tensor | None:
    """Labels [num_samples] for a model of ``num_classes`` classes (0: unconditional, returns None): ``given`` with
    1 entry (broadcast) or ``num_samples`` entries, each in [0, num_classes); else 0, 1, .., K-1 cycled."""
    if num_classes == 0:
        if given:
            raise ValueError("class_labels given but the model is unconditional")
        return None
    if given is None:
        return torch.arange(num_samples) % num_classes
    if len(given) not in (1, num_samples):
        raise ValueError(f"class_labels must have 1 or num_samples={num_samples} entries, got {len(given)}")
    bad = [c for c in given if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"class_labels must lie in [0, {num_classes - 1}], got {bad}")
    labels = torch.tensor([int(c) for c in given], dtype=torch.long)
    return labels.expand(num_samples).clone() if len(given) == 1 else labels


def conditioned_model(model: Callable, labels: torch.Tensor | None, guidance_scale: float, null_label: int,
                      eps_channels: int | None = None) -> tuple[Callable, dict[str, Any]]:
    """(model to call, model_kwargs) for a sampling loop: ``model`` with ``y=labels``, wrapped in
    :class:`ClassifierFreeGuidance` when ``guidance_scale != 1``; unconditional (labels None) only with scale 1."""
    if labels is None:
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale:g} needs a class-conditional model (this one is not)")
        return model, {}
    if guidance_scale == 1.0:
        return model, {"y": labels}
    return ClassifierFreeGuidance(model, guidance_scale, null_label=null_label, eps_channels=eps_channels), {"y": labels}


def classifier_cond_fn(classifier: Callable, scale: float = 1.0) -> Callable:
    """cond_fn(x, t, y) = scale * grad_x log softmax(classifier(x, t))[y] (Dhariwal & Nichol 2021, Alg. 1-2)."""

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **_kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs class labels y in model_kwargs")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[torch.arange(len(y), device=y.device), y]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022, Sec. 2.3): s = max(1, quantile_p(|x0|)) per example,
    x0 <- clamp(x0, -s, s) / s.  Use as `denoised_fn` (with clip_denoised=False)."""
    flat = x0.detach().abs().reshape(x0.shape[0], -1).float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def make_dynamic_threshold(percentile: float = 0.995) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `denoised_fn` applying `dynamic_threshold` with the given percentile."""
    return lambda x0: dynamic_threshold(x0, percentile)
