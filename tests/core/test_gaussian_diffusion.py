import math

import pytest
import torch

from diffusion_core import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
)
from diffusion_core.losses import mean_flat

F64 = torch.float64


def make(T=1000, mean="epsilon", var="fixed_small", loss="mse", schedule="linear", **kw):
    return GaussianDiffusion(betas=get_named_beta_schedule(schedule, T), model_mean_type=mean,
                             model_var_type=var, loss_type=loss, **kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_buffers_are_float64_and_cast_on_extraction():
    d = make()
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_recipm1_alphas_cumprod"):
        assert getattr(d, name).dtype == F64
    x = torch.randn(3, 2, 4, 4)
    assert d.q_sample(x, torch.tensor([0, 5, 999])).dtype == torch.float32
    assert d.q_sample(x.double(), torch.tensor([0, 5, 999])).dtype == F64
    assert d.q_sample(x.half(), torch.tensor([0, 5, 999])).dtype == torch.float16


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_bayes_rule_closed_form(schedule):
    """q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x0, 1-ab_{t-1}):
    precision = a_t/b_t + 1/(1-ab_{t-1}), mean = (sqrt(a_t) x_t / b_t + sqrt(ab_{t-1}) x0/(1-ab_{t-1})) / precision."""
    d = make(schedule=schedule)
    betas = get_named_beta_schedule(schedule, 1000)
    g = gen(1)
    t = torch.tensor([1, 2, 10, 300, 998, 999])
    x0 = torch.randn(6, 5, generator=g, dtype=F64)
    xt = torch.randn(6, 5, generator=g, dtype=F64)
    a = (1 - betas)[t, None]
    b = betas[t, None]
    ab_prev = torch.cumprod(1 - betas, 0)[t - 1, None]
    prec = a / b + 1 / (1 - ab_prev)
    mean = (a.sqrt() * xt / b + ab_prev.sqrt() * x0 / (1 - ab_prev)) / prec
    m, v, logv = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(m, mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(v, (1 / prec).expand_as(v), rtol=1e-10, atol=0)
    torch.testing.assert_close(logv, (1 / prec).log().expand_as(v), rtol=1e-10, atol=1e-12)


def test_posterior_matches_brute_force_bayes_on_a_grid():
    """Numerically normalise prior x likelihood on a fine grid: an oracle that uses no algebra at all."""
    d = make(T=100)
    t, x0, xt = 40, 0.3, -0.7
    b = d.betas[t].item()
    ab_prev = d.alphas_cumprod[t - 1].item()
    grid = torch.linspace(-4, 4, 200001, dtype=F64)
    logp = (-(xt - math.sqrt(1 - b) * grid) ** 2 / (2 * b)
            - (grid - math.sqrt(ab_prev) * x0) ** 2 / (2 * (1 - ab_prev)))
    w = torch.softmax(logp, 0)
    mean = (w * grid).sum()
    var = (w * (grid - mean) ** 2).sum()
    m, v, _ = d.q_posterior_mean_variance(torch.tensor([[x0]], dtype=F64), torch.tensor([[xt]], dtype=F64),
                                          torch.tensor([t]))
    assert m.item() == pytest.approx(mean.item(), abs=1e-8)
    assert v.item() == pytest.approx(var.item(), rel=1e-6)


def test_posterior_at_t0_and_clipped_log_variance():
    d = make()
    assert d.posterior_variance[0].item() == 0.0
    assert d.posterior_log_variance_clipped[0].item() == math.log(d.posterior_variance[1].item())
    torch.testing.assert_close(d.posterior_log_variance_clipped[1:], d.posterior_variance[1:].log())
    x0, xt = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    m, _, _ = d.q_posterior_mean_variance(x0, xt, torch.tensor([0, 0]))
    torch.testing.assert_close(m, x0)  # at t=0 the posterior mean is x0 itself
    assert torch.equal(d.fixed_large_variance[1:], d.betas[1:])
    assert d.fixed_large_variance[0] == d.posterior_variance[1]


def test_round_trips_eps_xstart_v_xprev():
    d = make(schedule="cosine")
    g = gen(2)
    x0 = torch.randn(8, 3, 4, 4, generator=g, dtype=F64)
    eps = torch.randn(8, 3, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 50, 200, 500, 800, 990, 999])
    xt = d.q_sample(x0, t, noise=eps)
    torch.testing.assert_close(d.predict_xstart_from_eps(xt, t, eps), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.predict_eps_from_xstart(xt, t, x0), eps, rtol=1e-7, atol=1e-7)
    v = d.get_velocity(x0, eps, t)
    torch.testing.assert_close(d.predict_xstart_from_v(xt, t, v), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d.predict_eps_from_v(xt, t, v), eps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d.predict_v_from_xstart(xt, t, x0), v, rtol=1e-9, atol=1e-9)
    m, _, _ = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(d.predict_xstart_from_xprev(xt, t, m), x0, rtol=1e-8, atol=1e-8)


def test_q_sample_moments_monte_carlo():
    d = make()
    n = 200_000
    x0 = torch.full((n, 1), 0.6, dtype=F64)
    for tt in (0, 100, 500, 999):
        t = torch.full((n,), tt)
        xt = d.q_sample(x0, t, generator=gen(tt))
        ab = d.alphas_cumprod[tt].item()
        mean, var = math.sqrt(ab) * 0.6, 1 - ab
        se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / n)
        assert abs(xt.mean().item() - mean) < 5 * se_mean
        assert abs(xt.var().item() - var) < 5 * se_var
        m, v, lv = d.q_mean_variance(x0[:2], t[:2])
        assert m[0].item() == pytest.approx(mean) and v[0].item() == pytest.approx(var)
        assert lv[0].item() == pytest.approx(math.log(var))


def test_normal_kl():
    m = torch.randn(10, dtype=F64)
    lv = torch.randn(10, dtype=F64)
    assert torch.equal(normal_kl(m, lv, m, lv), torch.zeros(10, dtype=F64))
    m2, lv2 = torch.randn(10, dtype=F64), torch.randn(10, dtype=F64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, (0.5 * lv).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), ref)
    torch.testing.assert_close(normal_kl(m, lv, 0.0, 0.0), 0.5 * (-1 - lv + lv.exp() + m**2))


def test_discretized_likelihood_is_a_distribution_close_to_exact():
    levels = torch.linspace(-1, 1, 256, dtype=F64)
    for mu, log_s in ((0.1, -3.0), (-0.95, -1.0), (0.999, -5.0)):
        means = torch.full_like(levels, mu)
        ls = torch.full_like(levels, log_s)
        ll = discretized_gaussian_log_likelihood(levels, means=means, log_scales=ls)
        assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-9)  # the bins telescope exactly
        s = math.exp(log_s)
        cdf = torch.special.ndtr
        exact = cdf((levels + 1 / 255 - mu) / s) - cdf((levels - 1 / 255 - mu) / s)
        exact[0] = cdf(torch.tensor((-1 + 1 / 255 - mu) / s, dtype=F64))
        exact[-1] = 1 - cdf(torch.tensor((1 - 1 / 255 - mu) / s, dtype=F64))
        assert (ll.exp() - exact).abs().max().item() < 2e-3  # tanh approximation of Phi


def test_bits_per_dim_of_a_perfect_model():
    """A model that knows x0 makes p(x_{t-1}|x_t) equal the true posterior: every KL term is 0 and the bound is
    the prior term plus the decoder NLL of N(x0, beta_tilde_1) on the data's own bin."""
    T = 100
    d = make(T=T, mean="start_x", var="fixed_small")
    g = gen(3)
    x0 = (torch.randint(0, 256, (4, 3, 4, 4), generator=g).to(F64) / 127.5 - 1)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # include both edge bins
    out = d.calc_bpd_loop(lambda x, t: x0, x0, clip_denoised=True, generator=g)
    assert out["vb"].shape == (4, T) and out["mse"].shape == (4, T)
    assert out["vb"][:, :-1].abs().max().item() < 1e-9  # columns T-1..1: KL terms
    assert out["xstart_mse"].abs().max().item() == 0.0
    assert out["mse"].max().item() < 1e-12
    # decoder term (last column = step 0): exact Gaussian bin mass with std sqrt(beta_tilde_1), in bits
    s = d.posterior_variance[1].sqrt().item()
    cdf = torch.special.ndtr
    half = torch.tensor(1 / 255 / s, dtype=F64)
    p = torch.where(x0.abs() > 0.999, cdf(half), cdf(half) - cdf(-half))
    decoder = mean_flat(-p.log2())
    torch.testing.assert_close(out["vb"][:, -1], decoder, rtol=2e-3, atol=0)
    # prior term: KL(N(sqrt(ab_T) x0, 1-ab_T) || N(0,1)) in bits
    ab = d.alphas_cumprod[-1].item()
    prior = mean_flat(0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0**2)) / math.log(2)
    torch.testing.assert_close(out["prior_bpd"], prior)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + prior)


def _const_model(out):
    return lambda x, t, **kw: out


def test_p_mean_variance_variance_types():
    T = 200
    x = torch.randn(4, 2, 3, 3, dtype=F64)
    t = torch.tensor([0, 1, 100, 199])
    eps = torch.randn_like(x)
    for var, vbuf in (("fixed_small", "posterior_variance"), ("fixed_large", "fixed_large_variance")):
        d = make(T=T, var=var)
        out = d.p_mean_variance(_const_model(eps), x, t, clip_denoised=False)
        torch.testing.assert_close(out["variance"], getattr(d, vbuf)[t].reshape(-1, 1, 1, 1).expand_as(x))
        torch.testing.assert_close(out["pred_xstart"], d.predict_xstart_from_eps(x, t, eps))
        torch.testing.assert_close(out["mean"], d.q_posterior_mean_variance(out["pred_xstart"], x, t)[0])
    d = make(T=T, var="learned_range")
    for v, expected in ((1.0, d.betas.log()), (-1.0, d.posterior_log_variance_clipped)):
        out = d.p_mean_variance(_const_model(torch.cat([eps, torch.full_like(eps, v)], 1)), x, t)
        torch.testing.assert_close(out["log_variance"], expected[t].reshape(-1, 1, 1, 1).expand_as(x))
    d = make(T=T, var="learned")
    out = d.p_mean_variance(_const_model(torch.cat([eps, torch.full_like(eps, -3.0)], 1)), x, t)
    torch.testing.assert_close(out["variance"], torch.full_like(x, math.exp(-3.0)))
    with pytest.raises(ValueError, match="learned variance"):
        d.p_mean_variance(_const_model(eps), x, t)


def test_mean_types_agree_on_the_same_prediction():
    """eps, x0, v and previous-x models that encode the same x0 give the same mean."""
    T = 300
    g = gen(4)
    x0 = torch.rand(4, 2, 3, 3, generator=g, dtype=F64) * 1.6 - 0.8
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    t = torch.tensor([1, 20, 150, 299])
    d = make(T=T, mean="start_x")
    eps = d.predict_eps_from_xstart(x, t, x0)
    ref = d.p_mean_variance(_const_model(x0), x, t)
    outs = {
        "epsilon": eps,
        "velocity": d.predict_v_from_xstart(x, t, x0),
        "previous_x": d.q_posterior_mean_variance(x0, x, t)[0],
    }
    for mean_type, output in outs.items():
        got = make(T=T, mean=mean_type).p_mean_variance(_const_model(output), x, t)
        torch.testing.assert_close(got["pred_xstart"], ref["pred_xstart"], rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(got["mean"], ref["mean"], rtol=1e-8, atol=1e-8)


def test_clip_and_denoised_fn():
    d = make(T=50, mean="start_x")
    x = torch.zeros(2, 1, 2, 2)
    big = torch.full_like(x, 3.0)
    assert d.p_mean_variance(_const_model(big), x, torch.tensor([5, 5]))["pred_xstart"].max() == 1.0
    assert d.p_mean_variance(_const_model(big), x, torch.tensor([5, 5]), clip_denoised=False)["pred_xstart"].max() == 3
    out = d.p_mean_variance(_const_model(big), x, torch.tensor([5, 5]), clip_denoised=False,
                            denoised_fn=lambda z: z / 6)
    assert torch.allclose(out["pred_xstart"], torch.full_like(x, 0.5))


def test_p_sample_uses_injected_noise_and_no_noise_at_t0():
    d = make(T=100)
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    eps_out = torch.randn_like(x)
    noise = torch.randn_like(x)
    t = torch.tensor([0, 1, 70])
    out = d.p_sample(_const_model(eps_out), x, t, noise=noise)
    pmv = d.p_mean_variance(_const_model(eps_out), x, t)
    expected = pmv["mean"] + torch.tensor([0.0, 1, 1], dtype=F64).reshape(-1, 1, 1, 1) * (
        0.5 * pmv["log_variance"]).exp() * noise
    torch.testing.assert_close(out["sample"], expected)
    a = d.p_sample(_const_model(eps_out), x, t, generator=gen(5))["sample"]
    b = d.p_sample(_const_model(eps_out), x, t, noise=torch.randn(x.shape, generator=gen(5), dtype=F64))["sample"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_condition_mean_and_condition_score():
    d = make(T=100)
    x = torch.randn(2, 1, 2, 2, dtype=F64)
    t = torch.tensor([10, 60])
    eps = torch.randn_like(x)
    grad = torch.randn_like(x)

    def cond_fn(xx, tt, y=None):
        assert y is not None
        return grad

    pmv = d.p_mean_variance(_const_model(eps), x, t, clip_denoised=False)
    mean = d.condition_mean(cond_fn, pmv, x, t, model_kwargs={"y": torch.tensor([1, 2])})
    torch.testing.assert_close(mean, pmv["mean"] + pmv["variance"] * grad)
    cs = d.condition_score(cond_fn, pmv, x, t, model_kwargs={"y": torch.tensor([1, 2])})
    ab = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(cs["pred_xstart"], d.predict_xstart_from_eps(x, t, eps - (1 - ab).sqrt() * grad))
    # p_sample applies condition_mean
    noise = torch.randn_like(x)
    s = d.p_sample(_const_model(eps), x, t, clip_denoised=False, cond_fn=cond_fn, noise=noise,
                   model_kwargs={"y": torch.tensor([0, 0])})["sample"]
    torch.testing.assert_close(s, mean + (0.5 * pmv["log_variance"]).exp() * noise)


def test_ddim_step_formula_and_reverse_inverts_it():
    d = make(T=100)
    g = gen(6)
    x = torch.randn(2, 2, 3, 3, generator=g, dtype=F64)
    c = torch.randn_like(x)
    t = torch.tensor([30, 31])
    noise = torch.randn_like(x)
    out = d.ddim_sample(_const_model(c), x, t, clip_denoised=False, eta=1.0, noise=noise)
    ab, abp = d.alphas_cumprod[t].reshape(-1, 1, 1, 1), d.alphas_cumprod[t - 1].reshape(-1, 1, 1, 1)
    x0 = (x - (1 - ab).sqrt() * c) / ab.sqrt()
    sigma = ((1 - abp) / (1 - ab) * (1 - ab / abp)).sqrt()
    expected = abp.sqrt() * x0 + (1 - abp - sigma**2).sqrt() * c + sigma * noise
    torch.testing.assert_close(out["sample"], expected)
    # eta=1 DDIM has the DDPM posterior variance
    torch.testing.assert_close(sigma**2, d.posterior_variance[t].reshape(-1, 1, 1, 1))
    # with a constant-eps model, reverse (t -> t+1) then forward (t+1 -> t) is the identity
    up = d.ddim_reverse_sample(_const_model(c), x, t, clip_denoised=False)["sample"]
    down = d.ddim_sample(_const_model(c), up, t + 1, clip_denoised=False)["sample"]
    torch.testing.assert_close(down, x, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError):
        d.ddim_reverse_sample(_const_model(c), x, t, eta=0.5)


def test_loops_are_reproducible_and_progressive_yields_every_step():
    d = make(T=40)
    m = _const_model(torch.zeros(2, 1, 4, 4))
    a = d.p_sample_loop(m, (2, 1, 4, 4), generator=gen(7))
    b = d.p_sample_loop(m, (2, 1, 4, 4), generator=gen(7))
    assert torch.equal(a, b)
    steps = list(d.p_sample_loop_progressive(m, (2, 1, 4, 4), generator=gen(7)))
    assert [s["t"] for s in steps] == list(range(39, -1, -1)) and torch.equal(steps[-1]["sample"], a)
    steps = list(d.ddim_sample_loop_progressive(m, (2, 1, 4, 4), generator=gen(7), eta=0.0))
    assert len(steps) == 40
    noise = torch.randn(2, 1, 4, 4, generator=gen(8))
    final = list(d.ddim_sample_loop_progressive(m, (2, 1, 4, 4), noise=noise))[-1]["sample"]
    assert torch.equal(d.ddim_sample_loop(m, (2, 1, 4, 4), noise=noise), final)
    # zero eps with eta=0 keeps x / sqrt(ab) fixed: the final x0 is x_T / sqrt(ab_{T-1}), clipped
    torch.testing.assert_close(final, (noise / d.sqrt_alphas_cumprod[-1].item()).clamp(-1, 1))


def _losses_setup(mean="epsilon", var="fixed_small", loss="mse", T=100, **kw):
    d = make(T=T, mean=mean, var=var, loss=loss, **kw)
    g = gen(9)
    x0 = torch.rand(4, 2, 3, 3, generator=g, dtype=F64) * 2 - 1
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=F64)
    t = torch.tensor([0, 3, 50, 99])
    return d, x0, noise, t


@pytest.mark.parametrize("mean", ["epsilon", "start_x", "velocity", "previous_x"])
def test_training_losses_mse_targets(mean):
    d, x0, noise, t = _losses_setup(mean=mean)
    pred = torch.randn_like(x0)
    terms = d.training_losses(_const_model(pred), x0, t, noise=noise)
    xt = d.q_sample(x0, t, noise=noise)
    target = {"epsilon": noise, "start_x": x0,
              "velocity": d.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1) * noise
              - d.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1) * x0,
              "previous_x": d.q_posterior_mean_variance(x0, xt, t)[0]}[mean]
    expected = ((target - pred) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], expected)
    torch.testing.assert_close(terms["loss"], expected)
    assert "vb" not in terms


def test_hybrid_loss_detaches_the_mean_in_the_vb_term_and_rescales():
    d, x0, noise, t = _losses_setup(var="learned_range", loss="mse")
    out = torch.randn(4, 4, 3, 3, dtype=F64, requires_grad=True)

    def model(x, tt):
        return out * 1.0

    terms = d.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    grad_vb = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)[0]
    assert grad_vb[:, :2].abs().max() == 0 and grad_vb[:, 2:].abs().max() > 0
    grad_mse = torch.autograd.grad(terms["mse"].sum(), out)[0]
    assert grad_mse[:, 2:].abs().max() == 0
    # vb equals the bound term of p_mean_variance on the same output (KL for t>0, decoder NLL at t=0)
    xt = d.q_sample(x0, t, noise=noise)
    vb = d._vb_terms_bpd(lambda *a: out.detach(), x0, xt, t, clip_denoised=False)["output"]
    torch.testing.assert_close(terms["vb"], vb)
    rd = make(T=100, var="learned_range", loss="rescaled_mse")
    rterms = rd.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(rterms["vb"], terms["vb"] * 0.1)  # T / 1000 with T = 100


@pytest.mark.parametrize("loss", ["kl", "rescaled_kl"])
def test_kl_losses_are_the_bound(loss):
    d, x0, noise, t = _losses_setup(var="learned_range", loss=loss)
    out = torch.randn(4, 4, 3, 3, dtype=F64)
    terms = d.training_losses(_const_model(out), x0, t, noise=noise)
    xt = d.q_sample(x0, t, noise=noise)
    vb = d._vb_terms_bpd(_const_model(out), x0, xt, t, clip_denoised=False)["output"]
    torch.testing.assert_close(terms["loss"], vb * (100 if loss == "rescaled_kl" else 1))
    assert set(terms) == {"loss"}


@pytest.mark.parametrize("mean,weight", [
    ("epsilon", lambda snr, g: torch.clamp(snr, max=g) / snr),
    ("start_x", lambda snr, g: torch.clamp(snr, max=g)),
    ("velocity", lambda snr, g: torch.clamp(snr, max=g) / (snr + 1)),
])
def test_min_snr_weighting(mean, weight):
    d, x0, noise, t = _losses_setup(mean=mean, snr_gamma=5.0)
    pred = torch.randn_like(x0)
    terms = d.training_losses(_const_model(pred), x0, t, noise=noise)
    ab = d.alphas_cumprod[t]
    w = weight(ab / (1 - ab), 5.0)
    assert not torch.allclose(w, torch.ones_like(w))
    torch.testing.assert_close(terms["loss"], terms["mse"] * w)
    with pytest.raises(ValueError):
        make(mean="previous_x", snr_gamma=5.0)


def test_enums_accept_names_and_reject_garbage():
    d = make(mean="EPSILON", var="LEARNED_RANGE", loss="rescaled_mse")
    assert d.model_mean_type is ModelMeanType.EPSILON and d.model_var_type is ModelVarType.LEARNED_RANGE
    assert d.loss_type is LossType.RESCALED_MSE
    with pytest.raises(ValueError, match="EPSILON"):
        make(mean="noise")
    with pytest.raises(ValueError):
        GaussianDiffusion(betas=torch.tensor([0.1, 1.5]), model_mean_type="epsilon",
                          model_var_type="fixed_small", loss_type="mse")
