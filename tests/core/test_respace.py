import pytest
import torch

from diffusion_core import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)
from diffusion_core.respace import base_diffusion, original_num_steps

F64 = torch.float64


def test_space_timesteps_ddim_stride():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim30") == set(range(0, 1000, 34))  # smallest stride giving exactly 30
    assert space_timesteps(100, "ddim100") == set(range(100))
    with pytest.raises(ValueError, match="exactly 300"):
        space_timesteps(1000, "ddim300")


def test_space_timesteps_sections():
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    sections = [sorted(k for k in kept if lo <= k < lo + 100) for lo in (0, 100, 200)]
    assert [len(s) for s in sections] == [10, 15, 20]
    assert all(s[0] == lo and s[-1] == lo + 99 for s, lo in zip(sections, (0, 100, 200), strict=True))
    # one section: N evenly spaced steps with both ends
    assert space_timesteps(1000, [4]) == {0, 333, 666, 999}
    assert space_timesteps(10, "3") == {0, 4, 9}  # strides 4.5 accumulate: 0, 4.5 -> 4 (ties to even), 9
    # uneven division: earlier sections take the remainder (10 = 4 + 3 + 3)
    assert space_timesteps(10, [2, 2, 2]) == {0, 3, 4, 6, 7, 9}
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, [6, 1])


def _kwargs(T=1000, schedule="linear"):
    return dict(betas=get_named_beta_schedule(schedule, T), model_mean_type=ModelMeanType.EPSILON,
                model_var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.MSE)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_spaced_diffusion_keeps_alpha_bar_at_kept_steps(schedule):
    base = GaussianDiffusion(**_kwargs(schedule=schedule))
    use = space_timesteps(1000, "ddim25")
    sp = SpacedDiffusion(use, **_kwargs(schedule=schedule))
    keep = sorted(use)
    assert sp.num_timesteps == 25 and sp.timestep_map.tolist() == keep
    torch.testing.assert_close(sp.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12, atol=0)
    assert original_num_steps(sp) == 1000 and torch.equal(sp.original_betas, base.betas)
    b = base_diffusion(sp)
    assert type(b) is GaussianDiffusion and torch.equal(b.betas, base.betas) and b.config == sp.config


def test_full_spacing_reproduces_the_base_process():
    base = GaussianDiffusion(**_kwargs())
    sp = SpacedDiffusion(range(1000), **_kwargs())
    torch.testing.assert_close(sp.betas, base.betas, rtol=1e-10, atol=0)
    torch.testing.assert_close(sp.posterior_log_variance_clipped, base.posterior_log_variance_clipped, rtol=1e-9,
                               atol=0)


def test_model_and_cond_fn_receive_original_timesteps():
    sp = SpacedDiffusion(space_timesteps(1000, "ddim10"), **_kwargs())
    seen = []

    def model(x, t, **kw):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)

    def cond_fn(x, t, **kw):
        seen.append(("cond", t.tolist()))
        return torch.zeros_like(x)

    x = torch.randn(2, 1, 2, 2)
    sp.p_sample(model, x, torch.tensor([9, 3]), cond_fn=cond_fn)
    assert seen == [[900, 300], ("cond", [900, 300])]
    seen.clear()
    sp.ddim_sample(model, x, torch.tensor([1, 0]), cond_fn=cond_fn)
    assert seen == [[100, 0], ("cond", [100, 0])]
    seen.clear()
    sp.training_losses(model, x, torch.tensor([5, 2]))
    assert seen == [[500, 200]]


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_sampling_loops_give_the_model_original_timesteps_for_every_batch_size(loop):
    """The loops pass step_index, which maps steps through a cached [steps, batch] table instead of indexing."""
    sp = SpacedDiffusion(space_timesteps(1000, "ddim10"), **_kwargs())
    seen = []

    def model(x, t, **kw):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)

    for batch in (2, 3, 2):
        seen.clear()
        getattr(sp, loop)(model, (batch, 1, 2, 2), generator=torch.Generator().manual_seed(0))
        assert seen == [[s] * batch for s in range(900, -1, -100)]
    seen.clear()
    sp.p_mean_variance(model, torch.zeros(2, 1, 2, 2), torch.tensor([3, 3]), True, None, None, 3)  # positional
    assert seen == [[300, 300]]


def test_create_diffusion_matches_dit_arguments():
    d = create_diffusion("")
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == 1000
    assert d.model_mean_type is ModelMeanType.EPSILON and d.model_var_type is ModelVarType.LEARNED_RANGE
    assert d.loss_type is LossType.MSE
    torch.testing.assert_close(d.betas, get_named_beta_schedule("linear", 1000), rtol=1e-10, atol=0)
    assert create_diffusion(None).num_timesteps == 1000
    assert create_diffusion("ddim50").timestep_map.tolist() == list(range(0, 1000, 20))
    assert create_diffusion("250").num_timesteps == 250
    assert create_diffusion(use_kl=True).loss_type is LossType.RESCALED_KL
    assert create_diffusion(rescale_learned_sigmas=True).loss_type is LossType.RESCALED_MSE
    assert create_diffusion(learn_sigma=False).model_var_type is ModelVarType.FIXED_LARGE
    assert create_diffusion(learn_sigma=False, sigma_small=True).model_var_type is ModelVarType.FIXED_SMALL
    assert create_diffusion(predict_xstart=True).model_mean_type is ModelMeanType.START_X
    assert create_diffusion(predict_v=True).model_mean_type is ModelMeanType.VELOCITY
    cos = create_diffusion(noise_schedule="squaredcos_cap_v2", diffusion_steps=100)
    torch.testing.assert_close(cos.alphas_cumprod,
                               torch.cumprod(1 - get_named_beta_schedule("cosine", 100), 0), rtol=1e-12, atol=0)
    assert create_diffusion(snr_gamma=5.0).snr_gamma == 5.0
    with pytest.raises(ValueError):
        create_diffusion(predict_xstart=True, predict_v=True)
    with pytest.raises(ValueError, match="valid names"):
        create_diffusion(noise_schedule="nope")


def test_diffusions_pickle_without_their_device_caches():
    import pickle

    d = create_diffusion("ddim10", learn_sigma=False)
    x = torch.zeros(2, 1, 2, 2)
    d.q_sample(x, torch.tensor([1, 2]))
    assert d._cache
    e = pickle.loads(pickle.dumps(d))
    assert e._cache == {} and torch.equal(e.alphas_cumprod, d.alphas_cumprod)
    assert e.timestep_map.tolist() == d.timestep_map.tolist()
    torch.testing.assert_close(e.q_sample(x, torch.tensor([1, 2]), noise=x + 1), d.q_sample(x, torch.tensor([1, 2]),
                                                                                         noise=x + 1))
