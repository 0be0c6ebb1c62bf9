"""The sampling loops' fast path (per-step coefficient rows, inference_mode) against the gathered per-row path.

The oracle is the code as it was before the fast path: the same loops written with the public one-step methods
called with a [B] step tensor (every coefficient gathered by index_select) under ``torch.no_grad``. Each
product in the fast path is the same float operation, so the images must be *equal*, not merely close.
"""

import pytest
import torch

from diffusion_core import GaussianDiffusion, get_named_beta_schedule, sample
from diffusion_core.respace import SpacedDiffusion, space_timesteps
from diffusion_core.samplers import respaced


def _model(out_channels_factor: int = 1):
    """A deterministic non-linear 'network' that depends on x and t (and returns 2C for learned variance)."""

    def model(x, t, **_kw):
        h = torch.tanh(0.7 * x + 1e-3 * t.to(x.dtype).view(-1, 1, 1, 1)) * 1.3
        return torch.cat([h, torch.sin(x)], 1) if out_channels_factor == 2 else h

    return model


def _diffusion(mean: str, var: str, T: int = 40) -> GaussianDiffusion:
    return GaussianDiffusion(betas=get_named_beta_schedule("linear", T), model_mean_type=mean,
                             model_var_type=var, loss_type="mse")


def _old_loop(d, model, noise, step, **kw):
    """The pre-fast-path loop: one [B] step tensor per step, gathered coefficients, torch.no_grad."""
    img = noise
    for i in reversed(range(d.num_timesteps)):
        t = torch.full((img.shape[0],), i, dtype=torch.long)
        with torch.no_grad():
            img = step(model, img, t, **kw)["sample"]
    return img


CASES = [("epsilon", "fixed_small"), ("epsilon", "fixed_large"), ("start_x", "fixed_small"),
         ("velocity", "fixed_large"), ("previous_x", "fixed_small"), ("epsilon", "learned_range"),
         ("velocity", "learned")]


@pytest.mark.parametrize("mean, var", CASES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_loop_equals_gathered_path(mean: str, var: str, batch: int, clip: bool) -> None:
    d = _diffusion(mean, var)
    model = _model(2 if var.startswith("learned") else 1)
    noise = torch.randn(batch, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    new = d.p_sample_loop(model, noise.shape, noise=noise, clip_denoised=clip,
                          generator=torch.Generator().manual_seed(1))
    old = _old_loop(d, model, noise, d.p_sample, clip_denoised=clip, generator=torch.Generator().manual_seed(1))
    assert torch.equal(new, old)
    assert not new.is_inference()  # the loop's result can be modified in place by the caller


@pytest.mark.parametrize("mean, var", CASES)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_loop_equals_gathered_path(mean: str, var: str, eta: float) -> None:
    base = _diffusion(mean, var, T=100)
    d = SpacedDiffusion(space_timesteps(100, "ddim10"), betas=base.betas, **base.config)
    model = _model(2 if var.startswith("learned") else 1)
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    new = d.ddim_sample_loop(model, noise.shape, noise=noise, eta=eta, generator=torch.Generator().manual_seed(2))
    old = _old_loop(d, model, noise, d.ddim_sample, eta=eta, generator=torch.Generator().manual_seed(2))
    assert torch.equal(new, old)


@pytest.mark.parametrize("mean, var", CASES)
def test_p_mean_variance_step_index_equals_gathered(mean: str, var: str) -> None:
    """The DPM-Solver loop uses p_mean_variance(step_index=...); its x0 and mean must equal the gathered ones."""
    d = _diffusion(mean, var)
    model = _model(2 if var.startswith("learned") else 1)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    for i in (0, 1, 17, 39):
        t = torch.full((3,), i)
        a = d.p_mean_variance(model, x, t)
        b = d.p_mean_variance(model, x, t, step_index=i)
        assert torch.equal(a["pred_xstart"], b["pred_xstart"]) and torch.equal(a["mean"], b["mean"])
        assert torch.equal(torch.as_tensor(b["log_variance"]).expand(x.shape), a["log_variance"])


def test_sample_interface_runs_in_inference_mode_and_returns_a_normal_tensor() -> None:
    d = _diffusion("epsilon", "fixed_small", T=100)
    seen = []

    def model(x, t, **_kw):
        seen.append(torch.is_inference_mode_enabled())
        return torch.zeros_like(x)

    for sampler, steps in (("ddpm", 10), ("ddim", 10), ("dpm_solver", 5)):
        seen.clear()
        out = sample(d, model, (2, 1, 4, 4), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
        assert seen and all(seen) and not out.is_inference()
        out.add_(1.0)  # a normal tensor: in-place updates are allowed


def test_ddim_via_sample_equals_gathered_loop() -> None:
    d = _diffusion("epsilon", "fixed_small", T=100)
    model = _model()
    noise = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    new = sample(d, model, noise.shape, sampler="ddim", steps=20, noise=noise)
    old = _old_loop(respaced(d, "ddim", 20), model, noise, respaced(d, "ddim", 20).ddim_sample)
    assert torch.equal(new, old)
