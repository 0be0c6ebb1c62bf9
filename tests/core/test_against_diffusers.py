"""diffusers' schedulers as an external oracle (dev extra): schedules, one DDPM / DDIM step, DPM-Solver++(2M).

Differences in convention that the tests account for:
- diffusers' `linear` is linspace(beta_start, beta_end, T) for every T; ours (guided-diffusion) rescales by 1000/T.
- diffusers' DDIM "leading" spacing uses stride T // N; our "ddimN" looks for the stride giving exactly N steps,
  which differs when T % N != 0 (an explicit SpacedDiffusion reproduces diffusers' steps).
- guided-diffusion's DDIM re-derives eps from the clipped x0, i.e. diffusers' `use_clipped_model_output=True`.
- diffusers keeps the schedule in float32; the step tests upcast it to float64 (see `_float64`).
"""

import pytest
import torch

from diffusion_core import GaussianDiffusion, SpacedDiffusion, get_named_beta_schedule, space_timesteps
from diffusion_core.samplers import dpm_solver_sample
from diffusion_core.simple import DDIMNoiseScheduler, DDPMNoiseScheduler

from ._analytic import GaussianDataModel

diffusers = pytest.importorskip("diffusers")

# diffusers keeps betas / alpha-bars in float32, which costs it up to ~1e-3 absolute at t=1 (1 - alpha_bar loses
# digits). The step tests therefore upcast the scheduler's schedule to float64 and compare in float64 (TOL64); the
# schedule tests compare with diffusers as shipped, at float32 tolerance.
TOL64 = dict(rtol=1e-9, atol=1e-9)


def _float64(sched):
    """Upcast a diffusers scheduler's schedule tensors so it computes in float64."""
    sched.betas = sched.betas.double()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
    for name in ("one", "final_alpha_cumprod"):
        if hasattr(sched, name):
            setattr(sched, name, torch.as_tensor(getattr(sched, name), dtype=torch.float64))
    return sched


PRED = {"epsilon": "epsilon", "sample": "start_x", "v_prediction": "velocity"}


def _const(out):
    return lambda x, t, **kw: out


@pytest.mark.parametrize("name,kwargs", [
    ("linear", {}),
    ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    ("squaredcos_cap_v2", {}),
    ("sigmoid", {}),
])
def test_beta_schedules_and_alpha_bars(name, kwargs):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kwargs)
    ours = get_named_beta_schedule(name, 1000)
    torch.testing.assert_close(ours.float(), ref.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.cumprod(1 - ours, 0).float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-9)


def test_linear_differs_from_diffusers_for_T_not_1000_by_the_1000_over_T_scale():
    ours = get_named_beta_schedule("linear", 250)
    plain = diffusers.DDPMScheduler(num_train_timesteps=250, beta_schedule="linear").betas
    assert not torch.allclose(ours.float(), plain)
    scaled = diffusers.DDPMScheduler(num_train_timesteps=250, beta_schedule="linear", beta_start=4e-4,
                                     beta_end=0.08).betas
    torch.testing.assert_close(ours.float(), scaled, rtol=1e-6, atol=1e-9)


def _inputs(C=3, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, C, 8, 8, generator=g, dtype=dtype)
    out = torch.randn(4, C, 8, 8, generator=g, dtype=dtype) * scale  # large enough that clipping matters
    return x, out


@pytest.mark.parametrize("prediction", list(PRED))
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_matches_diffusers(prediction, variance, clip):
    ref = _float64(diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type=variance,
                                           clip_sample=clip, prediction_type=prediction))
    d = GaussianDiffusion(betas=ref.betas, model_mean_type=PRED[prediction], model_var_type=variance,
                          loss_type="mse")
    x, out = _inputs()
    if variance == "learned_range":
        v = torch.rand(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
        out = torch.cat([out, v], 1)
    clipped_any = False
    for t in (999, 500, 37, 1, 0):
        r = ref.step(out, t, x, generator=torch.Generator().manual_seed(t))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        o = d.p_sample(_const(out), x, torch.full((4,), t), clip_denoised=clip, noise=noise)
        torch.testing.assert_close(o["pred_xstart"], r.pred_original_sample, **TOL64)
        torch.testing.assert_close(o["sample"], r.prev_sample, **TOL64)
        clipped_any |= bool((r.pred_original_sample.abs() == 1).any())
    assert clipped_any == clip


@pytest.mark.parametrize("prediction", list(PRED))
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_step_matches_diffusers(prediction, eta, clip):
    ref = _float64(diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                                           prediction_type=prediction, set_alpha_to_one=True, steps_offset=0))
    ref.set_timesteps(50)
    base_betas = ref.betas
    use = space_timesteps(1000, "ddim50")
    assert sorted(use) == sorted(ref.timesteps.tolist())  # T % N == 0: the two spacings agree
    d = SpacedDiffusion(use, betas=base_betas, model_mean_type=PRED[prediction], model_var_type="fixed_small",
                        loss_type="mse")
    x, out = _inputs(seed=2)
    for t in (980, 500, 20, 0):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        r = ref.step(out, t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise if eta else None)
        o = d.ddim_sample(_const(out), x, torch.full((4,), t // 20), clip_denoised=clip, eta=eta, noise=noise)
        torch.testing.assert_close(o["pred_xstart"], r.pred_original_sample, **TOL64)
        torch.testing.assert_close(o["sample"], r.prev_sample, **TOL64)


def test_ddim_leading_spacing_differs_when_T_is_not_a_multiple_of_N():
    ref = _float64(diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                           set_alpha_to_one=True, steps_offset=0))
    ref.set_timesteps(30)
    leading = sorted(ref.timesteps.tolist())
    assert leading == list(range(0, 1000, 33))[:30]
    assert sorted(space_timesteps(1000, "ddim30")) == list(range(0, 1000, 34))
    # with diffusers' own steps, the spaced process reproduces its trajectory
    d = SpacedDiffusion(leading, betas=ref.betas, model_mean_type="epsilon", model_var_type="fixed_small",
                        loss_type="mse")
    x, out = _inputs(seed=3, scale=0.5)
    xr, xo = x.clone(), x.clone()
    for k, t in enumerate(ref.timesteps.tolist()):
        xr = ref.step(out, t, xr, eta=0.0).prev_sample
        xo = d.ddim_sample(_const(out), xo, torch.full((4,), 29 - k), clip_denoised=False)["sample"]
    torch.testing.assert_close(xo, xr, **TOL64)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_pp_2m_matches_diffusers(steps):
    """Same time grid as diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, final sigma 0)."""
    ref = _float64(diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                         algorithm_type="dpmsolver++", solver_order=2))
    ref.set_timesteps(steps)
    ab = ref.alphas_cumprod  # set_timesteps stores sigmas as float32: recompute them in float64
    ref.sigmas = torch.cat([((1 - ab) / ab).sqrt()[ref.timesteps], torch.zeros(1, dtype=torch.float64)])
    d = GaussianDiffusion(betas=ref.betas, model_mean_type="epsilon", model_var_type="fixed_small",
                          loss_type="mse")
    mu = torch.tensor([-0.3, 0.4], dtype=torch.float64).reshape(2, 1, 1)
    s = torch.tensor([0.3, 0.6], dtype=torch.float64).reshape(2, 1, 1)
    model = GaussianDataModel(mu, s, d.alphas_cumprod)
    noise = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, t.expand(8)), t, x).prev_sample
    ours = dpm_solver_sample(d, model, noise.shape, noise=noise, clip_denoised=False,
                             timesteps=ref.timesteps.tolist(), lower_order_final=False)
    # the multistep scheduler's step itself runs in float32 (it upcasts/downcasts the sample): float32 tolerance
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=2e-6)


def test_simple_faces_match_diffusers_schedulers():
    """The tutorial faces against diffusers as shipped (float32 schedule): float32 tolerance."""
    tol = dict(rtol=1e-4, atol=2e-3)  # diffusers' float32 1 - alpha_bar near t=0 (see the module docstring)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    ours = DDPMNoiseScheduler(1000, "linear", clip_sample=True)
    x0, out = _inputs(seed=5, scale=1.0, dtype=torch.float32)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    r = ref.step(out, 400, x0, generator=torch.Generator().manual_seed(0))
    o = ours.step(out, 400, x0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(o.prev_sample, r.prev_sample, **tol)
    torch.testing.assert_close(o.pred_original_sample, r.pred_original_sample, **tol)

    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                  set_alpha_to_one=True, steps_offset=0)
    ref.set_timesteps(50)
    ours = DDIMNoiseScheduler(1000, "linear", clip_sample=False)
    ours.set_timesteps(50)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    xr, xo = x0.clone(), x0.clone()
    for t in ours.timesteps:
        xr = ref.step(out, int(t), xr, eta=0.0).prev_sample
        xo = ours.step(out, t, xo).prev_sample
    torch.testing.assert_close(xo, xr, **tol)
