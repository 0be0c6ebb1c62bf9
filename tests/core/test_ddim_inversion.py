"""``ddim_reverse_sample_loop`` (DDIM inversion, Song et al. 2021, Sec. 4.3) against the exact probability-flow
ODE of Gaussian data (tests/core/_analytic.py), and decoding its latent back with DDIM."""

from __future__ import annotations

import pytest
import torch

from diffusion_core import GaussianDiffusion, get_named_beta_schedule

from ._analytic import GaussianDataModel

F64 = torch.float64


def _setup(T: int = 1000):
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", T), model_mean_type="epsilon",
                          model_var_type="fixed_small", loss_type="mse")
    mu, s = torch.tensor(0.3, dtype=F64), torch.tensor(0.5, dtype=F64)
    model = GaussianDataModel(mu, s, d.alphas_cumprod)
    x0 = mu + s * torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    return d, model, x0, mu, s


@pytest.mark.parametrize("stop_at", [100, 500, 999])
def test_inversion_follows_the_exact_ode(stop_at):
    d, model, x0, mu, s = _setup()
    latent = d.ddim_reverse_sample_loop(model, x0, clip_denoised=False, stop_at=stop_at)
    assert len(model.calls) == stop_at
    # x~ = x / sqrt(ab) - mu scales by sqrt((s^2 + sigma_k^2) / (s^2 + sigma_0^2)), sigma^2 = 1/ab - 1
    ab0, abk = d.alphas_cumprod[0], d.alphas_cumprod[stop_at]
    s2 = s**2
    y0 = x0 / ab0.sqrt() - mu
    exact = abk.sqrt() * (mu + y0 * ((s2 + 1 / abk - 1) / (s2 + 1 / ab0 - 1)).sqrt())
    torch.testing.assert_close(latent, exact, rtol=5e-3, atol=2e-3)  # Euler error: 6.5e-3 at |x| = 2.3


def test_decoding_the_latent_returns_the_image():
    d, model, x0, *_ = _setup()
    latent = d.ddim_reverse_sample_loop(model, x0, clip_denoised=False)
    back = d.ddim_sample_loop(model, x0.shape, noise=latent, clip_denoised=False)
    torch.testing.assert_close(back, x0, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(latent, x0, atol=0.1)  # the latent is far from the image
