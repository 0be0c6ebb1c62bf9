"""Timestep (noise-level) embeddings for the UNet.

The sinusoid is the Transformer position encoding (Vaswani et al. 2017, sec. 3.5) applied to the diffusion
timestep, as introduced for diffusion models by Ho et al. 2020 (appendix B). Two flags select between the
conventions found in the wild so that converted checkpoints reproduce their original network exactly:

* Ho et al. 2020 (TF code, diffusers ``UNet2DModel`` for ``google/ddpm-*``): ``[sin, cos]``, frequency
  denominator ``half - 1``  ->  ``flip_sin_to_cos=False, downscale_freq_shift=1``.
* Nichol & Dhariwal 2021 / ADM (guided-diffusion): ``[cos, sin]``, denominator ``half``  ->
  ``flip_sin_to_cos=True, downscale_freq_shift=0`` (our default).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SinusoidalTimestepEmbedding", "timestep_embedding"]


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, float32 ``[B, dim]``.

    With ``half = dim // 2`` and ``k = 0..half-1`` the frequencies are
    ``w_k = max_period ** (-k / (half - downscale_freq_shift))`` and the features are ``sin(t * w_k)`` followed by
    ``cos(t * w_k)`` (Vaswani et al. 2017 eq. in sec. 3.5; Ho et al. 2020 app. B); ``flip_sin_to_cos`` puts the
    cosines first. An odd ``dim`` gets one trailing zero column.
    """
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor, got shape {tuple(t.shape)}")
    half = dim // 2
    if half - downscale_freq_shift <= 0:
        raise ValueError(f"dim={dim} too small for downscale_freq_shift={downscale_freq_shift}")
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    # w_k = exp(-ln(P) * k / (half - shift)) == P^(-k / (half - shift))   (Vaswani et al. 2017, sec. 3.5)
    freqs = torch.exp(-math.log(max_period) * k / (half - downscale_freq_shift))
    angles = t.float()[:, None] * freqs[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class SinusoidalTimestepEmbedding(nn.Module):
    """``t -> Linear(SiLU(Linear(sinusoid(t))))``: the 2-layer timestep MLP of Ho et al. 2020 (app. B).

    ``frequency_dim`` is the width of the sinusoid (the UNet's base channel count), ``embed_dim`` the output
    width (4x base channels in DDPM/ADM). The sinusoid is always computed in float32 and then cast to the
    parameter dtype (autocast, if active, takes care of the matmuls).
    """

    def __init__(
        self,
        frequency_dim: int,
        embed_dim: int,
        max_period: float = 10000.0,
        flip_sin_to_cos: bool = True,
        downscale_freq_shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.fc1 = nn.Linear(frequency_dim, embed_dim)
        self.fc2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(
            t, self.frequency_dim, self.max_period, self.flip_sin_to_cos, self.downscale_freq_shift
        )
        return self.fc2(F.silu(self.fc1(freq.to(self.fc1.weight.dtype))))
