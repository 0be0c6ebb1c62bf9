"""Stateless per-row sampling steps: every row of a batch carries its own (t, t_prev), in ORIGINAL step indices.

These are the update rules of the samplers in `samplers.py` / `gaussian_diffusion.py` written for a batch whose
rows sit at different steps of different (respaced) schedules, as a step-level continuous-batching engine needs.
A row steps from original index t to t_prev (t_prev = -1: to the data, alpha_bar = 1). Respacing needs no
SpacedDiffusion here: a respaced step t -> t_prev has beta' = 1 - ab_t / ab_{t_prev} (Nichol & Dhariwal 2021,
Sec. 4), and every coefficient below is a function of (ab_t, ab_{t_prev}) only.

The model output is given (the caller runs the network once for many rows): C channels for eps / x0 / v, 2C with a
learned variance. Coefficients are computed in float64 on the CPU and cast to x's dtype and device.
"""

from __future__ import annotations

import math

import torch

from .gaussian_diffusion import GaussianDiffusion, ModelMeanType, ModelVarType
from .respace import base_diffusion
from .samplers import SAMPLERS, dpm_solver_timesteps, respaced

__all__ = ["sampler_timesteps", "alpha_bar", "predict_x0", "ddpm_step", "ddim_step", "dpm_solver_step",
           "guided_output"]

_F64 = torch.float64


def sampler_timesteps(diffusion: GaussianDiffusion, sampler: str, steps: int,
                      dpm_spacing: str = "time_quadratic") -> list[int]:
    """The original step indices, strictly decreasing, at which `sampler` with `steps` evaluates the model.

    ddpm / ddim: the kept steps of `samplers.respaced` (the same respacing as `samplers.sample`);
    dpm_solver: `samplers.dpm_solver_timesteps`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    base = base_diffusion(diffusion)
    if sampler == "dpm_solver":
        return dpm_solver_timesteps(base, steps, dpm_spacing)
    d = respaced(base, sampler, steps)
    kept = d.timestep_map.tolist() if hasattr(d, "timestep_map") else list(range(d.num_timesteps))
    return [int(t) for t in reversed(kept)]


# columns of the per-step coefficient table (see _rows)
AB, SQRT_AB, SQRT_1M_AB, SQRT_RECIP_AB, SQRT_RECIPM1_AB = range(5)


def _rows(diffusion: GaussianDiffusion, t: torch.Tensor) -> torch.Tensor:
    """float64 [B, 5] at original indices t (CPU): ab, sqrt(ab), sqrt(1 - ab), sqrt(1/ab), sqrt(1/ab - 1), with
    index -1 the data end (ab = 1). One gather from a table built once per diffusion by the same elementwise
    float64 ops (correctly rounded), so each value equals computing it for the row alone."""
    base = base_diffusion(diffusion)
    table = base._cache.get("step_table")
    if table is None:
        with torch.inference_mode(False):
            ab = torch.cat([base.alphas_cumprod, torch.ones(1, dtype=_F64)])
            table = base._cache["step_table"] = torch.stack(
                [ab, ab.sqrt(), (1.0 - ab).sqrt(), (1.0 / ab).sqrt(), (1.0 / ab - 1.0).sqrt()], dim=1)
    return table[torch.as_tensor(t, dtype=torch.long).cpu()]


def alpha_bar(diffusion: GaussianDiffusion, t: torch.Tensor) -> torch.Tensor:
    """float64 alpha_bar at original indices t [B] (CPU); index -1 means the data end, alpha_bar = 1."""
    return _rows(diffusion, t)[:, AB]


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 [B] vector as x.dtype on x.device, shaped [B, 1, ..., 1]."""
    return _as_cols(x, v[None])[0]


def _cols(x: torch.Tensor, *vs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Float64 [B] vectors as x.dtype columns [B, 1, ..., 1] on x.device (see _as_cols)."""
    return _as_cols(x, torch.stack(vs))


def _as_cols(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The K rows of a float64 [K, B] matrix as x.dtype columns [B, 1, ..., 1] on x.device, with one cast (and on
    a GPU one copy) for all of them; the cast is elementwise, so each column equals its own cast."""
    if x.device.type == "mps":  # no float64 on MPS: cast on the CPU first
        m = m.to(x.dtype)
    m = m.to(device=x.device, dtype=x.dtype)
    return m.reshape(m.shape[0], -1, *([1] * (x.ndim - 1))).unbind(0)


def _split(diffusion: GaussianDiffusion, x: torch.Tensor, model_output: torch.Tensor):
    """(mean part, variance part or None) of a model output, checking its shape."""
    C = x.shape[1]
    learned = diffusion.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
    want = (x.shape[0], 2 * C if learned else C, *x.shape[2:])
    if tuple(model_output.shape) != want:
        raise ValueError(f"model output shape {tuple(model_output.shape)} != {want} "
                         f"(model_var_type={diffusion.model_var_type.name})")
    return torch.split(model_output, C, dim=1) if learned else (model_output, None)


def predict_x0(diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor,
               clip: bool = True, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by the model output at per-row steps t, x0 clamped to [-1, 1] when `clip` and eps
    re-derived from that x0 (as `GaussianDiffusion.p_mean_variance` + `predict_eps_from_xstart` do).
    `rows`: the coefficient rows at t (`_rows(diffusion, t)`), when the caller has them already."""
    out, _ = _split(diffusion, x, model_output)
    mt = diffusion.model_mean_type
    if mt not in (ModelMeanType.EPSILON, ModelMeanType.START_X, ModelMeanType.VELOCITY):
        raise ValueError("per-row steps need an eps, x0 or v model; PREVIOUS_X predicts a fixed schedule's mean")
    r = _rows(diffusion, t) if rows is None else rows
    sqrt_ab, sqrt_1m_ab, sqrt_recip_ab, sqrt_recipm1_ab = _as_cols(x, r[:, SQRT_AB:].T)
    if mt is ModelMeanType.EPSILON:
        # x0 = x_t / sqrt(ab) - sqrt(1/ab - 1) eps   (inverse of Ho et al. 2020, Eq. 4)
        x0 = sqrt_recip_ab * x - sqrt_recipm1_ab * out
    elif mt is ModelMeanType.START_X:
        x0 = out
    else:
        # x0 = sqrt(ab) x_t - sqrt(1 - ab) v   (Salimans & Ho 2022, App. D)
        x0 = sqrt_ab * x - sqrt_1m_ab * out
    if clip:
        x0 = x0.clamp(-1, 1)
    # eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)   (inverse of Ho et al. 2020, Eq. 4)
    eps = (x - sqrt_ab * x0) / sqrt_1m_ab
    return x0, eps


def ddpm_step(diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              model_output: torch.Tensor, noise: torch.Tensor | None, clip: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_{t_prev} = mu + sigma z per row (Ho et al. 2020, Alg. 2), on the respaced process
    t -> t_prev; no noise on rows with t_prev = -1. Returns (x_prev, x0). `noise` may be None only when every
    row is final."""
    r, r_prev = _rows(diffusion, t), _rows(diffusion, t_prev)
    ab, ab_prev = r[:, AB], r_prev[:, AB]
    x0, _ = predict_x0(diffusion, x, t, model_output, clip, rows=r)
    _, var_out = _split(diffusion, x, model_output)
    beta = 1.0 - ab / ab_prev  # respaced beta' (Nichol & Dhariwal 2021, Sec. 4)
    # posterior mean coef1 x0 + coef2 x_t   (Ho et al. 2020, Eq. 7)
    coef1 = beta * r_prev[:, SQRT_AB] / (1.0 - ab)
    coef2 = (1.0 - ab_prev) * (1.0 - beta).sqrt() / (1.0 - ab)
    c1, c2 = _cols(x, coef1, coef2)
    mean = c1 * x0 + c2 * x
    final = torch.as_tensor(t_prev).cpu() < 0
    if bool(final.all()):
        return mean, x0
    # posterior variance beta_tilde = beta' (1 - ab_prev) / (1 - ab)   (Ho et al. 2020, Eq. 7); final rows get
    # a placeholder of 1 (their noise is masked out, as guided-diffusion's clipped log-variance is)
    post_var = torch.where(final, torch.ones((), dtype=_F64), beta * (1.0 - ab_prev) / (1.0 - ab))
    vt = diffusion.model_var_type
    if vt is ModelVarType.LEARNED:
        log_var = var_out
    elif vt is ModelVarType.LEARNED_RANGE:
        # Nichol & Dhariwal 2021, Eq. 15: log Sigma = v log beta + (1 - v) log beta_tilde, v = (out + 1) / 2
        frac = (var_out + 1) / 2
        log_var = frac * _col(beta.log(), x) + (1 - frac) * _col(post_var.log(), x)
    elif vt is ModelVarType.FIXED_LARGE:
        log_var = _col(torch.where(final, torch.ones((), dtype=_F64), beta).log(), x)  # Ho et al. 2020, Sec. 3.2
    else:
        log_var = _col(post_var.log(), x)
    if noise is None:
        raise ValueError("ddpm_step needs noise for rows with t_prev >= 0")
    keep = _col((~final).to(_F64), x)
    return mean + keep * torch.exp(0.5 * log_var) * noise, x0


def ddim_step(diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              model_output: torch.Tensor, eta: torch.Tensor | float, noise: torch.Tensor | None,
              clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step t -> t_prev per row (Song et al. 2021, Eq. 12, sigma(eta) from Eq. 16), eta per row.
    `noise` is used on rows with eta > 0 (None: no row is stochastic). Returns (x_prev, x0)."""
    r, r_prev = _rows(diffusion, t), _rows(diffusion, t_prev)
    ab, ab_prev = r[:, AB], r_prev[:, AB]
    x0, eps = predict_x0(diffusion, x, t, model_output, clip, rows=r)
    eta = torch.as_tensor(eta, dtype=_F64).cpu().expand(ab.shape)
    if not bool((eta != 0).any()):
        # Song et al. 2021, Eq. 12 with sigma = 0: sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps (table columns)
        c_x0, c_eps = _as_cols(x, r_prev[:, SQRT_AB:SQRT_1M_AB + 1].T)
        return c_x0 * x0 + c_eps * eps, x0
    if noise is None:
        raise ValueError("ddim_step needs noise when some row has eta > 0")
    # Song et al. 2021, Eq. 16: sigma = eta sqrt((1 - ab_prev)/(1 - ab)) sqrt(1 - ab/ab_prev)
    sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
    c_x0, c_eps, c_z = _cols(x, ab_prev.sqrt(), (1 - ab_prev - sigma**2).clamp(min=0).sqrt(), sigma)
    # Song et al. 2021, Eq. 12: sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
    return c_x0 * x0 + c_eps * eps + c_z * noise, x0


def dpm_solver_step(diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                    model_output: torch.Tensor, prev_x0: torch.Tensor | None, h_prev: torch.Tensor,
                    second_order: torch.Tensor, clip: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step t -> t_next per row (Lu et al. 2022b, Alg. 2); t_next = -1 ends at sigma = 0
    with x = D (first order, like `samplers.dpm_solver_sample_progressive`).

    D'_i = D_i on first-order rows (`second_order` False), else (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},
    r = h_prev / h. Returns (x_next, D_i, h_i), h_i the float64 [B] step in lambda (nan on final rows)."""
    r = _rows(diffusion, t)
    ab, ab_next = r[:, AB], alpha_bar(diffusion, t_next)
    d, _ = predict_x0(diffusion, x, t, model_output, clip, rows=r)
    final = torch.as_tensor(t_next).cpu() < 0

    def lam(a: torch.Tensor) -> torch.Tensor:  # lambda = log(alpha / sigma); -inf at ab = 0 (zero terminal SNR)
        return 0.5 * (a.log() - (1 - a).log())

    alpha_n, sigma_n, sigma = ab_next.sqrt(), (1 - ab_next).sqrt(), (1 - ab).sqrt()
    h = torch.where(final, torch.full_like(ab, math.nan), lam(torch.where(final, 0.5, ab_next)) - lam(ab))
    second = torch.as_tensor(second_order, dtype=torch.bool).cpu() & ~final
    dd = d
    if bool(second.any()):
        if prev_x0 is None:
            raise ValueError("second-order rows need prev_x0")
        r = torch.where(second, h_prev.to(_F64), torch.ones((), dtype=_F64)) / torch.where(second, h, 1.0)
        w = torch.where(second, 1 / (2 * r), torch.zeros((), dtype=_F64))
        dd = _col(1 + w, d) * d - _col(w, d) * prev_x0  # Lu et al. 2022b, Alg. 2
    # x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D'   (Lu et al. 2022b, Alg. 2)
    ratio = torch.where(final, torch.zeros((), dtype=_F64), sigma_n / sigma)
    coef = torch.where(final, torch.zeros((), dtype=_F64), alpha_n * torch.expm1(-h))
    x_next = _col(ratio, x) * x - _col(coef, x) * dd
    if bool(final.any()):
        x_next = torch.where(_col(final.to(_F64), x) > 0, d, x_next)  # final first-order step: x = D
    return x_next, d, h


def guided_output(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float,
                  eps_channels: int) -> torch.Tensor:
    """Classifier-free guidance per row: uncond + s (cond - uncond) on the first `eps_channels` channels
    (Ho & Salimans 2022, Eq. 6), the conditional output's remaining (variance) channels unchanged."""
    s = torch.as_tensor(scale, dtype=cond.dtype, device=cond.device)
    if s.ndim == 1:
        s = s.view(-1, *([1] * (cond.ndim - 1)))
    e = int(eps_channels)
    guided = uncond[:, :e] + s * (cond[:, :e] - uncond[:, :e])  # Ho & Salimans 2022, Eq. 6
    return torch.cat([guided, cond[:, e:]], dim=1)
