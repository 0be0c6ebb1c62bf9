"""Gaussian KL and discretized likelihood terms of the variational bound (all values in nats)."""

from __future__ import annotations

import math

import torch

__all__ = ["normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "mean_flat"]


def _as_tensor_like(v, ref: torch.Tensor) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=ref.dtype, device=ref.device)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, broadcasting; scalars are allowed.

    KL = 0.5 * (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2) - 1)
    (closed form for univariate Gaussians; Kingma & Welling 2014, App. B), evaluated as
    0.5 * (expm1(d) - d + (mean1 - mean2)^2 e^(-logvar2)) with d = logvar1 - logvar2, so identical
    Gaussians give exactly 0.
    """
    ref = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = _as_tensor_like(logvar1, ref), _as_tensor_like(logvar2, ref)
    d = logvar1 - logvar2
    return 0.5 * (torch.expm1(d) - d + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~= 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))   (Page 1977 approximation, as used by DDPM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) per element for data x in [-1, 1] quantised to 256 levels (bins of width 2/255).

    P(x) = Phi((x + 1/255 - mu)/s) - Phi((x - 1/255 - mu)/s), with the outermost bins extended to -inf / +inf
    (Ho et al. 2020, Eq. 13). `log_scales` is log of the standard deviation s.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # bin for x = -1 extends to -inf
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))  # bin for x = +1 extends to +inf
    log_mid = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # thresholds at +-0.999 pick the edge bins (their centres are exactly -1 and +1)
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))


def mean_flat(t: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: [B, ...] -> [B]."""
    return t.mean(dim=tuple(range(1, t.ndim))) if t.ndim > 1 else t
