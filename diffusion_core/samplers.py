"""Samplers behind one interface: ancestral DDPM, DDIM and DPM-Solver++(2M), chosen by name with a step count.

`sample(diffusion, model, shape, sampler="ddim", steps=50, ...)` respaces from the diffusion's base (original)
schedule, so it works the same for a GaussianDiffusion and for any SpacedDiffusion built from it; the model is
always called with original step indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from .gaussian_diffusion import GaussianDiffusion, plain_tensor, step_grad_mode
from .respace import SpacedDiffusion, base_diffusion, space_timesteps
from .rng import GeneratorLike
from .schedules import karras_sigmas

__all__ = [
    "SAMPLERS",
    "DPM_SPACINGS",
    "sample",
    "sample_progressive",
    "respaced",
    "dpm_solver_timesteps",
    "dpm_solver_sample",
    "dpm_solver_sample_progressive",
]

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpm_solver")
DPM_SPACINGS: tuple[str, ...] = ("time_quadratic", "time_uniform", "logsnr", "karras")


def _check_steps(steps: int, T: int) -> int:
    steps = int(steps)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] for a diffusion trained with {T} steps, got {steps}")
    return steps


def respaced(diffusion: GaussianDiffusion, sampler: str, steps: int) -> GaussianDiffusion:
    """The diffusion to run `sampler` with `steps` steps, built from the base schedule (cached on the base).

    ddim: the "ddimN" stride spacing when an integer stride gives exactly N steps, else N evenly spaced steps;
    ddpm: N evenly spaced steps (first and last included). steps == T returns the base diffusion itself."""
    base = base_diffusion(diffusion)
    T = base.num_timesteps
    steps = _check_steps(steps, T)
    if steps == T:
        return base
    cache = base.__dict__.setdefault("_respaced_cache", {})
    key = (sampler, steps)
    if key not in cache:
        use = None
        if sampler == "ddim":
            try:
                use = space_timesteps(T, f"ddim{steps}")
            except ValueError:
                use = None
        if use is None:
            use = space_timesteps(T, [steps])
        cache[key] = SpacedDiffusion(use, betas=base.betas, **base.config)
    return cache[key]


# ---------------------------------------------------------------------------------------------- DPM-Solver++
def dpm_solver_timesteps(diffusion: GaussianDiffusion, steps: int, spacing: str = "time_quadratic") -> list[int]:
    """`steps` strictly decreasing original step indices, from T-1 to 0, where DPM-Solver evaluates the model.

    time_quadratic: evenly spaced in sqrt(t), denser near the data (the "quadratic" selection of DDIM,
    Song et al. 2021, Sec. D.2); time_uniform: evenly spaced in t; logsnr: evenly spaced in
    lambda = log(alpha/sigma) (Lu et al. 2022a, Sec. 3.3); karras: evenly spaced in sigma^(1/7) of
    sigma = sqrt(1/ab - 1) (Karras et al. 2022, Eq. 5).  Points are snapped to the nearest step, and steps that
    collide after rounding are nudged apart so exactly `steps` distinct indices remain.
    """
    base = base_diffusion(diffusion)
    T = base.num_timesteps
    steps = _check_steps(steps, T)
    if spacing not in DPM_SPACINGS:
        raise ValueError(f"unknown DPM-Solver spacing {spacing!r}; valid: {', '.join(DPM_SPACINGS)}")
    if steps == 1:
        return [T - 1]
    if spacing == "time_uniform":
        idx = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    elif spacing == "time_quadratic":
        idx = (torch.linspace(math.sqrt(T - 1), 0, steps, dtype=torch.float64) ** 2).round().long().tolist()
    else:
        ab = base.alphas_cumprod
        log_sigma = 0.5 * torch.log((1 - ab) / ab)  # log of sqrt(1/ab - 1) = -lambda
        if spacing == "logsnr":
            targets = torch.linspace(float(log_sigma[-1]), float(log_sigma[0]), steps, dtype=torch.float64)
        else:
            targets = karras_sigmas(steps, float(log_sigma[0].exp()), float(log_sigma[-1].exp())).log()
        idx = (log_sigma[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    idx[0], idx[-1] = T - 1, 0
    for i in range(steps - 2, -1, -1):  # from the data end up: at least one above the next
        idx[i] = max(idx[i], idx[i + 1] + 1)
    idx[0] = min(idx[0], T - 1)
    for i in range(1, steps):  # from the noise end down: at least one below the previous, within [0, T-1]
        idx[i] = min(idx[i], idx[i - 1] - 1)
    return [int(i) for i in idx]


def dpm_solver_sample_progressive(
    diffusion: GaussianDiffusion,
    model: Callable,
    shape: Sequence[int],
    *,
    steps: int = 20,
    noise: torch.Tensor | None = None,
    generator: GeneratorLike = None,
    model_kwargs: dict | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable | None = None,
    device=None,
    progress: bool = False,
    spacing: str = "time_quadratic",
    timesteps: Sequence[int] | None = None,
    lower_order_final: bool = True,
) -> Iterator[dict]:
    """DPM-Solver++(2M), the multistep data-prediction solver of the probability-flow ODE (Lu et al. 2022b, Alg. 2).

    The model's x0 prediction D (from eps / x0 / v, learned-variance channels ignored, `denoised_fn` and clipping
    applied) at evaluation steps t_0 > ... > t_{N-1} drives
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D'_i,   h_i = lambda_{i+1} - lambda_i,
        D'_0 = D_0,  D'_i = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1},  r_i = h_{i-1} / h_i,
    with alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma). The last step goes to sigma = 0 at
    first order, i.e. returns D at t_{N-1} (like DDIM's final x0). With `lower_order_final` the interval into
    t_{N-1} is also taken at first order (D'_i = D_i), which avoids extrapolating D with the very uneven step
    ratio r of the last interval (the DPM-Solver authors' "lower_order_final" stabilisation).
    `timesteps` overrides the spacing (original indices, strictly decreasing).
    Yields dict(sample, pred_xstart, t) per model evaluation.
    """
    base = base_diffusion(diffusion)
    idx = list(timesteps) if timesteps is not None else dpm_solver_timesteps(base, steps, spacing)
    if not idx or any(b >= a for a, b in zip(idx, idx[1:], strict=False)) or idx[0] >= base.num_timesteps or idx[-1] < 0:
        raise ValueError(f"timesteps must be strictly decreasing indices in [0, {base.num_timesteps}), got {idx}")
    ab = base.alphas_cumprod[idx]
    alpha, sigma = ab.sqrt().tolist(), (1 - ab).sqrt().tolist()
    # lambda = log(alpha / sigma); -inf at alpha_bar = 0 (zero terminal SNR), where the first step is exact
    lam = [math.log(a) - math.log(s) if a > 0 else -math.inf for a, s in zip(alpha, sigma, strict=True)]

    x = base._initial(model, shape, noise, device, generator)
    prev_d, prev_h = None, None
    order = range(len(idx))
    if progress:
        from tqdm.auto import tqdm

        order = tqdm(order)
    ts = torch.tensor(idx, device=x.device).repeat_interleave(x.shape[0]).view(len(idx), -1)
    for i in order:
        with step_grad_mode():
            d = base.p_mean_variance(model, x, ts[i], clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                     model_kwargs=model_kwargs, step_index=idx[i])["pred_xstart"]
            if i == len(idx) - 1:
                x = d  # final first-order step to sigma = 0: x = D
            else:
                h = lam[i + 1] - lam[i]
                if prev_d is None or (lower_order_final and i == len(idx) - 2):
                    dd = d  # first order: DPM-Solver++(1) = DDIM (Lu et al. 2022b, Eq. 9)
                else:
                    r = prev_h / h
                    dd = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * prev_d  # Lu et al. 2022b, Alg. 2
                x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * dd
                prev_d, prev_h = d, h
        yield {"sample": x, "pred_xstart": d, "t": idx[i]}


def dpm_solver_sample(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], **kwargs) -> torch.Tensor:
    """Final sample of `dpm_solver_sample_progressive` (same keyword arguments)."""
    final = None
    for out in dpm_solver_sample_progressive(diffusion, model, shape, **kwargs):
        final = out
    return plain_tensor(final["sample"])


# ---------------------------------------------------------------------------------------------- shared interface
def sample_progressive(
    diffusion: GaussianDiffusion,
    model: Callable,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int | None = 50,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: GeneratorLike = None,
    model_kwargs: dict | None = None,
    clip_denoised: bool = True,
    device=None,
    progress: bool = False,
    denoised_fn: Callable | None = None,
    cond_fn: Callable | None = None,
    dpm_spacing: str = "time_quadratic",
) -> Iterator[dict]:
    """Yield dict(step, total, sample, pred_xstart) after each of the `total` model evaluations (step = 1..total).

    sampler: "ddpm" (ancestral), "ddim" (eta = 0 deterministic, eta = 1 ancestral-like) or "dpm_solver"
    (DPM-Solver++(2M); eta, cond_fn unsupported). steps: number of model evaluations, respaced from the base
    schedule (None: run `diffusion` as given). The final sample is x0 (in [-1, 1] when clip_denoised).
    Each step runs under ``torch.inference_mode`` (``no_grad`` with a cond_fn): the yielded tensors are inference
    tensors, read-only outside inference mode (``.clone()`` one to modify it in place).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if sampler == "dpm_solver":
        if cond_fn is not None:
            raise ValueError("cond_fn (classifier guidance) is supported by the ddpm and ddim samplers only")
        if eta != 0.0:
            raise ValueError("DPM-Solver++ is deterministic: eta must be 0")
        steps_ = diffusion.num_timesteps if steps is None else steps
        timesteps = None
        if steps is None and isinstance(diffusion, SpacedDiffusion):
            timesteps = diffusion.timestep_map.tolist()[::-1]
        gen = dpm_solver_sample_progressive(
            diffusion, model, shape, steps=steps_, noise=noise, generator=generator, model_kwargs=model_kwargs,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, device=device, progress=progress,
            spacing=dpm_spacing, timesteps=timesteps,
        )
        total = len(timesteps) if timesteps is not None else len(dpm_solver_timesteps(diffusion, steps_, dpm_spacing))
    else:
        d = diffusion if steps is None else respaced(diffusion, sampler, steps)
        total = d.num_timesteps
        common = dict(noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                      model_kwargs=model_kwargs, device=device, progress=progress, generator=generator)
        if sampler == "ddpm":
            if eta != 0.0:
                raise ValueError("eta applies to the ddim sampler only")
            gen = d.p_sample_loop_progressive(model, shape, **common)
        else:
            gen = d.ddim_sample_loop_progressive(model, shape, eta=eta, **common)
    for k, out in enumerate(gen, start=1):
        yield {"step": k, "total": total, "sample": out["sample"], "pred_xstart": out["pred_xstart"]}


def sample(
    diffusion: GaussianDiffusion,
    model: Callable,
    shape: Sequence[int],
    *,
    sampler: str = "ddim",
    steps: int | None = 50,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: GeneratorLike = None,
    model_kwargs: dict | None = None,
    clip_denoised: bool = True,
    device=None,
    progress: bool = False,
    denoised_fn: Callable | None = None,
    cond_fn: Callable | None = None,
    dpm_spacing: str = "time_quadratic",
) -> torch.Tensor:
    """Final x0 of `sample_progressive` (same arguments), as a normal (not inference) tensor.

    Without a cond_fn the whole loop runs under one ``torch.inference_mode``."""
    final = None
    with step_grad_mode(cond_fn):
        for out in sample_progressive(
            diffusion, model, shape, sampler=sampler, steps=steps, eta=eta, noise=noise, generator=generator,
            model_kwargs=model_kwargs, clip_denoised=clip_denoised, device=device, progress=progress,
            denoised_fn=denoised_fn, cond_fn=cond_fn, dpm_spacing=dpm_spacing,
        ):
            final = out
    return plain_tensor(final["sample"])
