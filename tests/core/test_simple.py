"""The tutorial faces are thin wrappers: they must agree exactly with the core they wrap."""

import pytest
import torch

from diffusion_core import create_diffusion, sample
from diffusion_core.simple import DDIMNoiseScheduler, DDPMNoiseScheduler, NoiseScheduler

from ._analytic import GaussianDataModel

MU = torch.tensor([0.2], dtype=torch.float64).reshape(1, 1, 1)
S = torch.tensor([0.5], dtype=torch.float64).reshape(1, 1, 1)


def test_add_noise_and_step_are_q_sample_and_p_sample():
    sched = NoiseScheduler(200, "cosine", prediction_type="v_prediction", variance_type="fixed_large")
    d = sched.diffusion
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 100, 199])
    assert torch.equal(sched.add_noise(x0, noise, t), d.q_sample(x0, t, noise=noise))
    out = torch.randn_like(x0)
    step = sched.step(out, 150, x0, noise=noise)
    ref = d.p_sample(lambda *a, **k: out, x0, torch.full((3,), 150), noise=noise)
    assert torch.equal(step.prev_sample, ref["sample"]) and torch.equal(step.pred_original_sample, ref["pred_xstart"])
    prev, x0_hat = step  # tuple-unpackable
    assert torch.equal(prev, ref["sample"])


@pytest.mark.parametrize("cls,name,eta", [(DDIMNoiseScheduler, "ddim", 0.0), (DDIMNoiseScheduler, "ddim", 1.0),
                                          (DDPMNoiseScheduler, "ddpm", 0.0)])
def test_tutorial_loop_equals_the_shared_sampler(cls, name, eta):
    sched = cls(1000, "linear")
    model = GaussianDataModel(MU, S, sched.diffusion.alphas_cumprod)
    sched.set_timesteps(25)
    assert len(sched.timesteps) == 25 and sched.timesteps[-1] == 0
    noise = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    x = noise
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(2)), t, x, eta=eta, generator=gen).prev_sample
    ref = sample(sched.diffusion, model, noise.shape, sampler=name, steps=25, eta=eta, noise=noise,
                 generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x, ref, rtol=0, atol=0)


def test_wraps_an_existing_diffusion_and_rejects_unknown_timesteps():
    d = create_diffusion("ddim50", learn_sigma=False)
    sched = DDIMNoiseScheduler(diffusion=d)
    assert sched.num_train_timesteps == 1000 and len(sched.timesteps) == 1000
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == list(range(900, -1, -100))
    with pytest.raises(ValueError, match="not one of"):
        sched.step(torch.zeros(1, 1, 2, 2), 901, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError):
        NoiseScheduler(prediction_type="noise")
