"""Noise schedules: the beta view (discrete VP process) and the sigma view (x_sigma = x0 + sigma * eps).

Both views describe one process: with alpha_bar_t = prod_{s<=t} (1 - beta_s),
    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps = sqrt(alpha_bar_t) * (x0 + sigma_t * eps),
    sigma_t = sqrt(1 / alpha_bar_t - 1)                                   (Kingma et al. 2021, VDM; Karras et al. 2022)
so the sigma view of a beta schedule noises data identically up to the scale sqrt(alpha_bar_t).

All schedules are float64 `torch.Tensor`s.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .rng import randint, randn

__all__ = [
    "BETA_SCHEDULES",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "rescale_zero_terminal_snr",
    "alphas_cumprod_from_betas",
    "sigmas_from_betas",
    "karras_sigmas",
    "Schedule",
    "add_sigma_noise",
    "ScheduleLogLinear",
    "ScheduleDDPM",
    "ScheduleLDM",
    "ScheduleCosine",
]

_F64 = torch.float64


def _linear(T: int) -> torch.Tensor:
    # DDPM (Ho et al. 2020, Sec. 4) linear 1e-4..0.02 for T=1000; guided-diffusion rescales by 1000/T so any T
    # gives the same total noise.
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=_F64)


def _scaled_linear(T: int) -> torch.Tensor:
    # Latent diffusion (Rombach et al. 2022, config "linear"): linspace of sqrt(beta) from 0.00085 to 0.012,
    # squared; like diffusers, not rescaled with T.
    return torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=_F64) ** 2


def _cosine(T: int) -> torch.Tensor:
    # Improved DDPM (Nichol & Dhariwal 2021, Eq. 17): alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008.
    return betas_for_alpha_bar(T, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)


def _sigmoid(T: int) -> torch.Tensor:
    # GeoDiff (Xu et al. 2022) sigmoid schedule: sigmoid(linspace(-6, 6)) mapped onto [beta_start, beta_end]
    # (the linear schedule's endpoints, scaled by 1000/T).
    scale = 1000.0 / T
    start, end = scale * 1e-4, scale * 0.02
    return torch.sigmoid(torch.linspace(-6.0, 6.0, T, dtype=_F64)) * (end - start) + start


def _quad(T: int) -> torch.Tensor:
    # DDPM reference code "quad": linspace of sqrt(beta) between the linear endpoints, squared.
    scale = 1000.0 / T
    return torch.linspace((scale * 1e-4) ** 0.5, (scale * 0.02) ** 0.5, T, dtype=_F64) ** 2


def _const(T: int) -> torch.Tensor:
    # DDPM reference code "const": beta_end everywhere.
    return torch.full((T,), 0.02 * 1000.0 / T, dtype=_F64)


def _jsd(T: int) -> torch.Tensor:
    # Sohl-Dickstein et al. 2015: beta_t = 1 / (T - t + 1), i.e. 1/T, 1/(T-1), ..., 1 (alpha_bar_T = 0).
    return 1.0 / torch.linspace(T, 1, T, dtype=_F64)


def _warmup(frac: float) -> Callable[[int], torch.Tensor]:
    # DDPM reference code "warmupX": the linear ramp over the first X% of steps, then constant beta_end.
    def fn(T: int) -> torch.Tensor:
        scale = 1000.0 / T
        start, end = scale * 1e-4, scale * 0.02
        betas = torch.full((T,), end, dtype=_F64)
        n = int(T * frac)
        betas[:n] = torch.linspace(start, end, n, dtype=_F64)
        return betas

    return fn


_NAMED: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "squaredcos_cap_v2": _cosine,
    "cosine": _cosine,
    "sigmoid": _sigmoid,
    "quad": _quad,
    "const": _const,
    "jsd": _jsd,
    "warmup10": _warmup(0.1),
    "warmup50": _warmup(0.5),
}
BETA_SCHEDULES: tuple[str, ...] = tuple(_NAMED)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> torch.Tensor:
    """Betas [T] (float64) of a named schedule; raises ValueError listing the valid names for an unknown one."""
    if schedule_name not in _NAMED:
        raise ValueError(
            f"unknown beta schedule {schedule_name!r}; valid names: {', '.join(BETA_SCHEDULES)}"
        )
    if int(num_diffusion_timesteps) < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    return _NAMED[schedule_name](int(num_diffusion_timesteps))


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> torch.Tensor:
    """Discretise a cumulative product alpha_bar(t), t in [0, 1], into T betas (float64).

    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)   (Nichol & Dhariwal 2021, Sec. 3.2)
    """
    T = int(num_diffusion_timesteps)
    betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=_F64)


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s)   (Ho et al. 2020, Sec. 2)."""
    return torch.cumprod(1.0 - torch.as_tensor(betas, dtype=_F64), dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift/scale sqrt(alpha_bar) so the last step has SNR exactly 0, keeping the first (Lin et al. 2023, Alg. 1)."""
    ab_sqrt = alphas_cumprod_from_betas(betas).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    # Lin et al. 2023, Alg. 1: shift so the last is 0, then scale so the first is unchanged.
    ab_sqrt = (ab_sqrt - last) * first / (first - last)
    ab = ab_sqrt**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def sigmas_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt(1 / alpha_bar_t - 1): the variance-exploding view of a VP schedule (Karras et al. 2022, Tab. 1)."""
    ab = alphas_cumprod_from_betas(betas)
    return ((1.0 - ab) / ab).sqrt()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n sigmas decreasing from sigma_max to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022, Eq. 5)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return torch.tensor([float(sigma_max)], dtype=_F64)
    ramp = torch.linspace(0.0, 1.0, n, dtype=_F64)
    lo, hi = float(sigma_min) ** (1.0 / rho), float(sigma_max) ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class Schedule:
    """Sigma view of a diffusion: a sorted (increasing) float64 list of noise levels; x_sigma = x0 + sigma * eps.

    `sample_batch(x0)` draws one training noise level per example (uniform over the table);
    `noise_batch(x0)` returns (x_sigma, sigma, eps); `alpha_bars` gives the equivalent VP alpha_bar = 1/(1+sigma^2).
    """

    def __init__(self, sigmas: torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=_F64).flatten()
        if sigmas.numel() == 0 or bool((sigmas < 0).any()):
            raise ValueError("sigmas must be a non-empty tensor of non-negative noise levels")
        self.sigmas = sigmas

    def __len__(self) -> int:
        return self.sigmas.numel()

    def __getitem__(self, i) -> torch.Tensor:
        return self.sigmas[i]

    @property
    def alpha_bars(self) -> torch.Tensor:
        # VDM (Kingma et al. 2021): alpha_bar = 1 / (1 + sigma^2)
        return 1.0 / (1.0 + self.sigmas**2)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> Schedule:
        """The sigma view of a beta schedule (same process, sigma_t = sqrt(1/alpha_bar_t - 1))."""
        return cls(sigmas_from_betas(betas))

    def sample_batch(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One noise level per example of x0, uniform over the table: float64 tensor [B] on x0's device."""
        idx = randint(len(self), x0.shape[0], generator=generator, device="cpu")
        return self.sigmas[idx].to(x0.device)

    def noise_batch(
        self, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 + sigma * eps, sigma [B], eps) with sigma from `sample_batch`."""
        sigma = self.sample_batch(x0, generator=generator)
        eps = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return add_sigma_noise(x0, sigma, eps), sigma, eps

    def sample_sigmas(self, steps: int) -> torch.Tensor:
        """`steps` decreasing sigmas evenly spaced over the table index from the largest to the smallest, then 0."""
        if not 1 <= steps <= len(self):
            raise ValueError(f"steps must be in [1, {len(self)}], got {steps}")
        idx = torch.linspace(len(self) - 1, 0, steps, dtype=_F64).round().long()
        return torch.cat([self.sigmas[idx], torch.zeros(1, dtype=_F64)])


def add_sigma_noise(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_sigma = x0 + sigma * eps with sigma [B] broadcast over the non-batch dims (Karras et al. 2022, Eq. 1)."""
    s = torch.as_tensor(sigma, device=x0.device).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return x0 + s * eps


class ScheduleLogLinear(Schedule):
    """N sigmas evenly spaced in log sigma between sigma_min and sigma_max (smalldiffusion's default toy schedule)."""

    def __init__(self, N: int, sigma_min: float = 0.02, sigma_max: float = 10.0):
        super().__init__(torch.logspace(math.log10(sigma_min), math.log10(sigma_max), N, dtype=_F64))


class ScheduleDDPM(Schedule):
    """Sigma view of the DDPM linear schedule (betas linspace(beta_start, beta_end, N), not rescaled)."""

    def __init__(self, N: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02):
        super().__init__(sigmas_from_betas(torch.linspace(beta_start, beta_end, N, dtype=_F64)))


class ScheduleLDM(Schedule):
    """Sigma view of the latent-diffusion schedule (betas = linspace(sqrt(beta_start), sqrt(beta_end), N)^2)."""

    def __init__(self, N: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        super().__init__(
            sigmas_from_betas(torch.linspace(beta_start**0.5, beta_end**0.5, N, dtype=_F64) ** 2)
        )


class ScheduleCosine(Schedule):
    """Sigma view of the Improved-DDPM cosine schedule (`squaredcos_cap_v2`, max_beta clipping included)."""

    def __init__(self, N: int = 1000):
        super().__init__(sigmas_from_betas(get_named_beta_schedule("cosine", N)))
