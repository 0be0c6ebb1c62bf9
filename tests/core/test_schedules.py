import math
import re

import pytest
import torch

from diffusion_core import GaussianDiffusion, get_named_beta_schedule
from diffusion_core.schedules import (
    BETA_SCHEDULES,
    Schedule,
    ScheduleCosine,
    ScheduleDDPM,
    ScheduleLDM,
    ScheduleLogLinear,
    add_sigma_noise,
    alphas_cumprod_from_betas,
    betas_for_alpha_bar,
    karras_sigmas,
    rescale_zero_terminal_snr,
    sigmas_from_betas,
)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
@pytest.mark.parametrize("T", [1000, 250])
def test_named_schedules_are_valid_float64(name, T):
    b = get_named_beta_schedule(name, T)
    assert b.dtype == torch.float64 and b.shape == (T,)
    assert bool((b > 0).all()) and bool((b <= 1).all())
    GaussianDiffusion(betas=b, model_mean_type="epsilon", model_var_type="fixed_small", loss_type="mse")


def test_linear_is_rescaled_by_1000_over_T():
    b = get_named_beta_schedule("linear", 1000)
    assert b[0].item() == pytest.approx(1e-4, rel=1e-12) and b[-1].item() == pytest.approx(0.02, rel=1e-12)
    b = get_named_beta_schedule("linear", 250)
    assert b[0].item() == pytest.approx(4e-4, rel=1e-12) and b[-1].item() == pytest.approx(0.08, rel=1e-12)
    assert torch.allclose(b[1:] - b[:-1], torch.full((249,), (0.08 - 4e-4) / 249, dtype=torch.float64))


def test_scaled_linear_quad_const_jsd_and_warmup():
    b = get_named_beta_schedule("scaled_linear", 1000)
    assert torch.allclose(b.sqrt(), torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64))
    q = get_named_beta_schedule("quad", 1000)
    assert q[0].item() == pytest.approx(1e-4) and q[-1].item() == pytest.approx(0.02)
    assert torch.allclose(q.sqrt().diff(), q.sqrt().diff()[0].expand(999))
    assert torch.equal(get_named_beta_schedule("const", 100), torch.full((100,), 0.2, dtype=torch.float64))
    j = get_named_beta_schedule("jsd", 10)
    assert torch.allclose(j, torch.tensor([1 / (10 - i) for i in range(10)], dtype=torch.float64))
    for name, frac in (("warmup10", 0.1), ("warmup50", 0.5)):
        w = get_named_beta_schedule(name, 1000)
        n = int(1000 * frac)
        assert torch.allclose(w[:n], torch.linspace(1e-4, 0.02, n, dtype=torch.float64))
        assert bool((w[n:] == 0.02).all())
    s = get_named_beta_schedule("sigmoid", 1000)
    assert bool((s.diff() > 0).all()) and 1e-4 < s[0] < s[-1] < 0.02


def test_cosine_matches_its_alpha_bar_and_caps_beta():
    T = 1000
    b = get_named_beta_schedule("cosine", T)
    assert torch.equal(b, get_named_beta_schedule("squaredcos_cap_v2", T))

    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    ab = alphas_cumprod_from_betas(b)
    expected = torch.tensor([f((i + 1) / T) / f(0) for i in range(T)], dtype=torch.float64)
    uncapped = b < 0.999
    assert bool(uncapped[:-1].all()) and b[-1].item() == 0.999  # only the last step hits max_beta
    assert torch.allclose(ab[:-1], expected[:-1], rtol=1e-10, atol=1e-14)


def test_betas_for_alpha_bar_reproduces_any_alpha_bar():
    def fn(t):
        return math.exp(-3 * t)

    b = betas_for_alpha_bar(50, fn, max_beta=0.999)
    ab = alphas_cumprod_from_betas(b)
    assert torch.allclose(ab, torch.tensor([fn((i + 1) / 50) for i in range(50)], dtype=torch.float64), rtol=1e-12)
    assert betas_for_alpha_bar(10, lambda t: 1 - t, max_beta=0.5).max().item() == 0.5


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_named_beta_schedule("linaer", 1000)
    for name in BETA_SCHEDULES:
        assert re.search(rf"\b{name}\b", str(err.value))


def test_rescale_zero_terminal_snr():
    b = get_named_beta_schedule("scaled_linear", 1000)
    r = rescale_zero_terminal_snr(b)
    ab, ab_r = alphas_cumprod_from_betas(b), alphas_cumprod_from_betas(r)
    assert ab_r[-1].item() == pytest.approx(0.0, abs=1e-15) and r[-1].item() == pytest.approx(1.0)
    assert ab_r[0].item() == pytest.approx(ab[0].item(), rel=1e-12)
    # sqrt(ab) is an affine map of the original sqrt(ab)
    a, c = ab.sqrt(), ab_r.sqrt()
    slope = (c[0] - c[-1]) / (a[0] - a[-1])
    assert torch.allclose(c, slope * (a - a[-1]), atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_sigma_view_and_beta_view_noise_data_identically(name):
    """x_t (beta view) == sqrt(ab_t) * (x0 + sigma_t * eps) (sigma view) for the same x0, eps, t."""
    betas = get_named_beta_schedule(name, 1000)
    d = GaussianDiffusion(betas=betas, model_mean_type="epsilon", model_var_type="fixed_small", loss_type="mse")
    sched = Schedule.from_betas(betas)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (16,), generator=g)
    x_t = d.q_sample(x0, t, noise=eps)
    x_sigma = add_sigma_noise(x0, sched[t], eps)
    scale = d.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, scale * x_sigma, rtol=1e-12, atol=1e-12)
    # and back: alpha_bar of the sigma view is the diffusion's alpha_bar
    torch.testing.assert_close(sched.alpha_bars, d.alphas_cumprod, rtol=1e-12, atol=0)


def test_sigma_schedule_classes():
    torch.testing.assert_close(ScheduleDDPM().sigmas, sigmas_from_betas(get_named_beta_schedule("linear", 1000)))
    torch.testing.assert_close(ScheduleLDM().sigmas,
                               sigmas_from_betas(get_named_beta_schedule("scaled_linear", 1000)))
    torch.testing.assert_close(ScheduleCosine(100).sigmas, sigmas_from_betas(get_named_beta_schedule("cosine", 100)))
    ll = ScheduleLogLinear(200)
    assert len(ll) == 200 and ll[0].item() == pytest.approx(0.02) and ll[-1].item() == pytest.approx(10.0)
    assert torch.allclose(ll.sigmas.log().diff(), ll.sigmas.log().diff()[0].expand(199))
    s = ll.sample_sigmas(10)
    assert s.shape == (11,) and s[0] == ll[-1] and s[-2] == ll[0] and s[-1] == 0 and bool((s.diff() < 0).all())


def test_sample_batch_draws_from_the_table_reproducibly():
    sched = ScheduleLogLinear(50)
    x0 = torch.zeros(256, 2)
    a = sched.sample_batch(x0, generator=torch.Generator().manual_seed(3))
    b = sched.sample_batch(x0, generator=torch.Generator().manual_seed(3))
    assert a.shape == (256,) and torch.equal(a, b)
    assert bool(torch.isin(a, sched.sigmas).all()) and a.unique().numel() > 30
    x, sigma, eps = sched.noise_batch(x0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, sigma.float()[:, None] * eps)


def test_karras_sigmas():
    s = karras_sigmas(10, 0.002, 80.0, rho=7.0)
    assert s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert bool((s.diff() < 0).all())
    r = s ** (1 / 7)
    assert torch.allclose(r.diff(), r.diff()[0].expand(9))
