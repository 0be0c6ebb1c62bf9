"""Per-row step functions against the existing sampling loops (the oracle): same noise, same images.

A row-wise driver runs `diffusion_core.steps` with every row's own (t, t_prev); it must reproduce
`samplers.sample` for DDPM / DDIM(eta) / DPM-Solver++(2M), for eps / x0 / v models, fixed and learned variances,
and rows of different samplers and step counts packed into one model call must each match their own loop.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_core import GaussianDiffusion, get_named_beta_schedule, sample
from diffusion_core.guidance import ClassifierFreeGuidance
from diffusion_core.rng import randn
from diffusion_core.steps import (
    alpha_bar,
    ddim_step,
    ddpm_step,
    dpm_solver_step,
    guided_output,
    sampler_timesteps,
)

T = 50
SHAPE = (3, 2, 4, 4)


class TinyModel(nn.Module):
    """A fixed random conv whose output depends on t (and on y when given): a stand-in network."""

    def __init__(self, out_channels: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(2, out_channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(out_channels, generator=g) * 0.1)
        self.emb = nn.Parameter(torch.randn(11, out_channels, generator=g) * 0.2, requires_grad=False)

    def forward(self, x, t, y=None):
        out = torch.tanh(self.conv(x)) * (1 + t.float().view(-1, 1, 1, 1) / T)
        if y is not None:
            out = out + self.emb[y].view(y.shape[0], -1, 1, 1)
        return out


def make(mean: str, var: str, schedule: str = "linear") -> tuple[GaussianDiffusion, TinyModel]:
    d = GaussianDiffusion(betas=get_named_beta_schedule(schedule, T), model_mean_type=mean, model_var_type=var,
                          loss_type="mse")
    learned = var in ("learned", "learned_range")
    return d, TinyModel(4 if learned else 2).eval()


class Row:
    """One request's state for the driver: its timesteps, position, x, generator and DPM history."""

    def __init__(self, d, sampler, steps, n, seed, eta=0.0):
        self.sampler, self.eta = sampler, eta
        self.ts = sampler_timesteps(d, sampler, steps)
        self.g = torch.Generator().manual_seed(seed)
        self.x = randn((n, *SHAPE[1:]), generator=[self.g] * n)
        self.pos, self.prev, self.h = 0, None, torch.full((n,), float("nan"), dtype=torch.float64)

    def done(self):
        return self.pos >= len(self.ts)


def advance(d, rows: list[Row], model) -> None:
    """One packed model call over all unfinished rows (per-row t), then each request's own update."""
    live = [r for r in rows if not r.done()]
    x = torch.cat([r.x for r in live])
    t = torch.cat([torch.full((r.x.shape[0],), r.ts[r.pos]) for r in live])
    with torch.no_grad():
        out_all = model(x, t)
    i = 0
    for r in live:
        n = r.x.shape[0]
        out, i = out_all[i:i + n], i + n
        tt = torch.full((n,), r.ts[r.pos])
        last = r.pos == len(r.ts) - 1
        tp = torch.full((n,), -1 if last else r.ts[r.pos + 1])
        if r.sampler == "ddpm":
            noise = randn(r.x.shape, generator=[r.g] * n)
            r.x, _ = ddpm_step(d, r.x, tt, tp, out, noise)
        elif r.sampler == "ddim":
            noise = randn(r.x.shape, generator=[r.g] * n) if r.eta else None
            r.x, _ = ddim_step(d, r.x, tt, tp, out, r.eta, noise)
        else:
            second = torch.full((n,), r.prev is not None and r.pos != len(r.ts) - 2)
            r.x, r.prev, r.h = dpm_solver_step(d, r.x, tt, tp, out, r.prev, r.h, second)
        r.pos += 1


def oracle(d, model, sampler, steps, n, seed, eta=0.0):
    g = torch.Generator().manual_seed(seed)
    return sample(d, model, (n, *SHAPE[1:]), sampler=sampler, steps=steps, eta=eta, generator=[g] * n)


CASES = [(m, v) for m in ("epsilon", "start_x", "velocity") for v in ("fixed_small", "fixed_large", "learned_range")]
CASES.append(("epsilon", "learned"))


@pytest.mark.parametrize("mean,var", CASES)
@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 50, 0.0), ("ddpm", 7, 0.0), ("ddim", 10, 0.0),
                                               ("ddim", 9, 0.7), ("dpm_solver", 8, 0.0), ("dpm_solver", 1, 0.0)])
def test_row_driver_matches_the_core_loop(mean, var, sampler, steps, eta):
    d, model = make(mean, var)
    row = Row(d, sampler, steps, 3, seed=5, eta=eta)
    while not row.done():
        advance(d, [row], model)
    ref = oracle(d, model, sampler, steps, 3, 5, eta)
    assert (row.x - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("mean,var", [("epsilon", "learned_range"), ("velocity", "fixed_small")])
def test_rows_of_different_samplers_and_steps_packed_together_each_match_their_loop(mean, var):
    d, model = make(mean, var, "cosine")
    specs = [("ddpm", 12, 2, 1, 0.0), ("ddim", 5, 1, 2, 0.0), ("dpm_solver", 9, 3, 3, 0.0), ("ddim", 20, 2, 4, 1.0)]
    rows = [Row(d, s, k, n, seed, eta) for s, k, n, seed, eta in specs]
    while not all(r.done() for r in rows):
        advance(d, rows, model)
    for r, (s, k, n, seed, eta) in zip(rows, specs, strict=True):
        assert (r.x - oracle(d, model, s, k, n, seed, eta)).abs().max().item() < 1e-4, (s, k)  # the bound


def test_sampler_timesteps_follow_the_core_respacing():
    d, _ = make("epsilon", "fixed_small")
    assert sampler_timesteps(d, "ddim", 10) == list(range(45, -1, -5))  # "ddim10": stride 5
    assert sampler_timesteps(d, "ddpm", T) == list(range(T - 1, -1, -1))
    assert sampler_timesteps(d, "dpm_solver", 4)[0] == T - 1 and sampler_timesteps(d, "dpm_solver", 4)[-1] == 0
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_timesteps(d, "euler", 4)


def test_alpha_bar_is_one_past_the_data_end():
    d, _ = make("epsilon", "fixed_small")
    ab = alpha_bar(d, torch.tensor([-1, 0, T - 1]))
    assert ab.dtype == torch.float64 and ab[0] == 1.0
    assert ab[1] == d.alphas_cumprod[0] and ab[2] == d.alphas_cumprod[-1]


def test_ddpm_final_rows_get_no_noise_and_others_do():
    d, model = make("epsilon", "fixed_small")
    x = torch.randn(SHAPE)
    t, out = torch.tensor([3, 3, 0]), model(x, torch.tensor([3, 3, 0]))
    a, _ = ddpm_step(d, x, t, torch.tensor([2, 2, -1]), out, torch.zeros(SHAPE))
    b, _ = ddpm_step(d, x, t, torch.tensor([2, 2, -1]), out, torch.ones(SHAPE))
    assert (a[2] == b[2]).all() and not torch.allclose(a[:2], b[:2])


def test_guided_output_matches_classifier_free_guidance_wrapper():
    model = TinyModel(4).eval()
    x, t, y = torch.randn(SHAPE), torch.tensor([3, 10, 40]), torch.tensor([1, 2, 3])
    scale = torch.tensor([1.5, 3.0, 0.0])
    ref = ClassifierFreeGuidance(model, scale, null_label=10, eps_channels=2)(x, t, y=y)
    cond, uncond = model(x, t, y=y), model(x, t, y=torch.full_like(y, 10))
    assert torch.allclose(guided_output(cond, uncond, scale, 2), ref, atol=1e-6)


def test_previous_x_models_are_refused():
    d, model = make("previous_x", "fixed_small")
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="PREVIOUS_X"):
        ddim_step(d, x, torch.tensor([3] * 3), torch.tensor([2] * 3), model(x, torch.tensor([3] * 3)), 0.0, None)
