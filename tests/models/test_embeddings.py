"""Timestep embedding vs diffusers' independent implementation (the oracle)."""

import pytest
import torch

from diffusion_core.models import SinusoidalTimestepEmbedding, timestep_embedding

emb_mod = pytest.importorskip("diffusers.models.embeddings")


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("dim", [128, 33, 8])
def test_matches_diffusers_get_timestep_embedding(flip: bool, shift: int, dim: int) -> None:
    t = torch.cat([torch.arange(0, 1000, 37), torch.tensor([999]), torch.rand(5) * 1000])
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    ref = emb_mod.get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert ours.shape == (t.shape[0], dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_known_values_ddpm_convention() -> None:
    # Ho et al. 2020: [sin(t w_k), cos(t w_k)] with w_k = 10000^(-k/(half-1)); closed form at dim=4 -> w = (1, 1e-4)
    t = torch.tensor([0.0, 2.0])
    e = timestep_embedding(t, 4, flip_sin_to_cos=False, downscale_freq_shift=1)
    expected = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],
            [
                torch.sin(torch.tensor(2.0)),
                torch.sin(torch.tensor(2e-4)),
                torch.cos(torch.tensor(2.0)),
                torch.cos(torch.tensor(2e-4)),
            ],
        ]
    )
    torch.testing.assert_close(e, expected, atol=1e-7, rtol=0)


def test_mlp_matches_diffusers_timestep_embedding() -> None:
    torch.manual_seed(0)
    ours = SinusoidalTimestepEmbedding(64, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    proj = emb_mod.Timesteps(64, flip_sin_to_cos=True, downscale_freq_shift=0)
    mlp = emb_mod.TimestepEmbedding(64, 256)
    mlp.linear_1.load_state_dict(ours.fc1.state_dict())
    mlp.linear_2.load_state_dict(ours.fc2.state_dict())
    t = torch.randint(0, 1000, (7,))
    torch.testing.assert_close(ours(t), mlp(proj(t)), atol=1e-6, rtol=0)


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        timestep_embedding(torch.zeros(2, 2), 8)
    assert timestep_embedding(torch.tensor(5), 8).shape == (1, 8)
