import pytest
import torch

from diffusion_core import (
    LossSecondMomentResampler,
    UniformSampler,
    create_diffusion,
    create_named_schedule_sampler,
)
from diffusion_core.rng import randn


def test_randn_single_and_list_of_generators():
    a = randn((3, 2, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, torch.randn((3, 2, 2), generator=torch.Generator().manual_seed(0)))
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    b = randn((3, 2, 2), generator=gens, dtype=torch.float64)
    for i, s in enumerate((5, 6, 7)):
        assert torch.equal(b[i], torch.randn((2, 2), generator=torch.Generator().manual_seed(s), dtype=torch.float64))
    with pytest.raises(ValueError, match="one generator per batch row"):
        randn((2, 2), generator=gens)
    assert randn((4,)).shape == (4,)


def test_uniform_sampler():
    s = UniformSampler(create_diffusion("ddim50"))
    assert s.num_timesteps == 50
    t, w = s.sample(1000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 49 and t.unique().numel() == 50
    assert torch.equal(w, torch.ones(1000))
    t2, _ = s.sample(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)


def _feed(sampler, T, rounds, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        ts = torch.arange(T)
        losses = (ts.double() + 1) * (1 + 0.1 * torch.rand(T, generator=g, dtype=torch.float64))
        sampler.update_with_local_losses(ts, losses)


def test_loss_second_moment_resampler_weights():
    T = 20
    s = LossSecondMomentResampler(T, history_per_term=3, uniform_prob=0.1)
    assert torch.equal(s.weights(), torch.ones(T, dtype=torch.float64))  # uniform until warmed up
    s.update_with_local_losses(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    assert torch.equal(s.weights(), torch.ones(T, dtype=torch.float64))
    hist = {t: [] for t in range(T)}
    g = torch.Generator().manual_seed(1)
    s = LossSecondMomentResampler(T, history_per_term=3, uniform_prob=0.1)
    for _ in range(5):  # 5 rounds > history 3: the oldest two are dropped
        losses = torch.rand(T, generator=g, dtype=torch.float64) * torch.arange(1, T + 1)
        s.update_with_local_losses(torch.arange(T), losses)
        for t in range(T):
            hist[t] = (hist[t] + [losses[t].item()])[-3:]
    rms = torch.tensor([sum(v * v for v in hist[t]) / 3 for t in range(T)], dtype=torch.float64).sqrt()
    expected = 0.9 * rms / rms.sum() + 0.1 / T
    torch.testing.assert_close(s.probabilities(), expected)
    # importance weights keep the objective unbiased: sum_t p_t * (1/(T p_t)) L_t = mean_t L_t
    t, w = s.sample(50_000, generator=torch.Generator().manual_seed(2))
    L = torch.arange(1, T + 1, dtype=torch.float64)
    assert abs((w.double() * L[t]).mean().item() - L.mean().item()) < 0.05 * L.mean().item()
    assert torch.bincount(t, minlength=T)[-1] > torch.bincount(t, minlength=T)[0]  # larger losses sampled more


def test_loss_second_moment_state_round_trip(tmp_path):
    T = 10
    s = LossSecondMomentResampler(T, history_per_term=4)
    _feed(s, T, 6)
    state = s.state_dict()
    path = tmp_path / "sampler.pt"
    torch.save(state, path)
    r = LossSecondMomentResampler(T, history_per_term=4, uniform_prob=0.5)
    r.load_state_dict(torch.load(path))
    assert r.uniform_prob == s.uniform_prob
    torch.testing.assert_close(r.weights(), s.weights(), rtol=0, atol=0)
    a = s.sample(64, generator=torch.Generator().manual_seed(3))
    b = r.sample(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the state is a copy, and both keep evolving identically
    state["loss_history"].zero_()
    _feed(s, T, 1, seed=9)
    _feed(r, T, 1, seed=9)
    torch.testing.assert_close(r.weights(), s.weights(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="T=10"):
        LossSecondMomentResampler(11, history_per_term=4).load_state_dict(state)


def test_injected_all_gather_shares_losses():
    T = 6
    calls = []

    def fake_all_gather(obj):  # two ranks; the other saw the same steps with doubled losses
        calls.append(obj)
        ts, losses = obj
        return [obj, (ts, [2 * v for v in losses])]

    s = LossSecondMomentResampler(T, history_per_term=2, all_gather=fake_all_gather)
    s.update_with_local_losses(torch.arange(T), torch.ones(T))
    assert len(calls) == 1 and s._warmed_up()
    torch.testing.assert_close(s._loss_history, torch.tensor([[1.0, 2.0]] * T, dtype=torch.float64))


def test_named_samplers():
    d = create_diffusion("")
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", d), LossSecondMomentResampler)
    with pytest.raises(ValueError, match="uniform, loss-second-moment"):
        create_named_schedule_sampler("importance", d)
