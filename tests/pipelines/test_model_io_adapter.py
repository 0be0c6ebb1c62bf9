"""The one config -> core adapter (build_diffusion / build_timestep_sampler / build_unet): every field of
DiffusionConfig and ModelConfig reaches what it configures, presets refuse conflicting fields, and the
registered config.json rebuilds the same diffusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_core import LossSecondMomentResampler, LossType, ModelMeanType, ModelVarType, UniformSampler
from pipelines.config import ConfigError, DiffusionConfig, ModelConfig, load_config
from pipelines.model_io import (
    build_diffusion,
    build_timestep_sampler,
    build_unet,
    diffusion_card,
    load_model_dir,
    unet_config,
    write_model_dir,
)


def _linear_alpha_bar(T: int) -> np.ndarray:
    # Ho et al. 2020, Sec. 4: beta linear from 1e-4 to 0.02 over T = 1000 steps; alpha_bar = prod(1 - beta)
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


def _cosine_alpha_bar(T: int, s: float = 0.008) -> np.ndarray:
    # Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi / 2)
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1 - betas)


# field -> (a value other than the default, what it must produce on the built diffusion / timestep sampler)
DIFFUSION_PROBES = {
    "noise_schedule": ("cosine", lambda d, s: np.allclose(d.alphas_cumprod.numpy(), _cosine_alpha_bar(1000))),
    "diffusion_steps": (250, lambda d, s: d.num_timesteps == 250),
    "predict": ("v", lambda d, s: d.model_mean_type is ModelMeanType.VELOCITY),
    "learn_sigma": (True, lambda d, s: d.model_var_type is ModelVarType.LEARNED_RANGE),
    "sigma_small": (True, lambda d, s: d.model_var_type is ModelVarType.FIXED_SMALL),
    "use_kl": (True, lambda d, s: d.loss_type is LossType.RESCALED_KL),
    "rescale_learned_sigmas": (True, lambda d, s: d.loss_type is LossType.RESCALED_MSE),
    "timestep_sampler": ("loss-second-moment", lambda d, s: isinstance(s, LossSecondMomentResampler)),
    "min_snr_gamma": (5.0, lambda d, s: d.snr_gamma == 5.0),
}


def _built(cfg: DiffusionConfig):
    d = build_diffusion(cfg)
    return d, build_timestep_sampler(cfg, d)


def test_every_diffusion_field_reaches_the_diffusion_or_the_timestep_sampler():
    assert set(DIFFUSION_PROBES) == set(DiffusionConfig.model_fields), "a DiffusionConfig field without a probe"
    base = _built(DiffusionConfig())
    assert np.allclose(base[0].alphas_cumprod.numpy(), _linear_alpha_bar(1000))
    assert isinstance(base[1], UniformSampler) and base[0].model_mean_type is ModelMeanType.EPSILON
    assert (base[0].model_var_type, base[0].loss_type, base[0].snr_gamma) == (ModelVarType.FIXED_LARGE,
                                                                            LossType.MSE, None)
    for name, (value, reached) in DIFFUSION_PROBES.items():
        assert not reached(*base), f"{name}: the probe already holds at the default"
        assert reached(*_built(DiffusionConfig(**{name: value}))), f"diffusion.{name}={value!r} does not reach the core"


@pytest.mark.parametrize(("spelling", "enum"), [("epsilon", ModelMeanType.EPSILON), ("x0", ModelMeanType.START_X),
                                                ("v", ModelMeanType.VELOCITY)])
def test_prediction_spellings_map_to_the_core_enum(spelling, enum):
    assert build_diffusion(DiffusionConfig(predict=spelling)).model_mean_type is enum


def test_min_snr_gamma_weights_the_training_loss():
    # a network that predicts eps = 0 has per-example MSE = mean(noise^2); min-SNR-gamma multiplies it by
    # min(SNR_t, gamma) / SNR_t (Hang et al. 2023, Eq. 9 for epsilon prediction), SNR_t = ab / (1 - ab)
    gamma, t = 5.0, torch.tensor([0, 10, 100, 500, 999])
    x0 = torch.zeros(5, 1, 4, 4)
    noise = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731
    plain = build_diffusion(DiffusionConfig()).training_losses(zero, x0, t, noise=noise)["loss"]
    weighted = build_diffusion(DiffusionConfig(min_snr_gamma=gamma)).training_losses(zero, x0, t, noise=noise)["loss"]
    ab = _linear_alpha_bar(1000)[t.numpy()]
    snr = ab / (1 - ab)
    assert np.allclose((weighted / plain).numpy(), np.minimum(snr, gamma) / snr, rtol=1e-5)


def test_fields_that_another_field_overrides_are_refused():
    with pytest.raises(ValueError, match="sigma_small"):
        DiffusionConfig(learn_sigma=True, sigma_small=True)
    with pytest.raises(ValueError, match="rescale_learned_sigmas"):
        DiffusionConfig(use_kl=True, rescale_learned_sigmas=True)


# field -> (a value under preset 'custom', the UNet config key it sets, the value expected there)
MODEL_PROBES = {
    "preset": ("ddpm_cifar10", "model_channels", 128),
    "model_channels": (64, "model_channels", 64),
    "channel_mult": ([1, 2], "channel_mult", [1, 2]),
    "num_res_blocks": (2, "num_res_blocks", 2),
    "attention_resolutions": ([4], "attention_resolutions", [4]),
    "num_heads": (4, "num_heads", 4),
    "head_channels": (16, "head_channels", 16),
    "use_scale_shift_norm": (True, "use_scale_shift_norm", True),
    "resblock_updown": (True, "resblock_updown", True),
    "dropout": (0.2, "dropout", 0.2),
    "class_conditional": (False, "num_classes", None),
    "class_dropout_prob": (0.3, "class_dropout_prob", 0.3),
    "use_checkpoint": (True, "use_checkpoint", True),
    "channels_last": (False, "channels_last", False),  # the default is True (the measured-faster layout)
}


def _unet(model: ModelConfig):
    with torch.device("meta"):  # the real constructor, no memory
        return build_unet(model, image_size=16, channels=1, num_classes=10, learn_sigma=False)


def test_every_model_field_reaches_the_unet_under_preset_custom():
    assert set(MODEL_PROBES) == set(ModelConfig.model_fields), "a ModelConfig field without a probe"
    base = _unet(ModelConfig(preset="custom")).config
    for name, (value, key, expected) in MODEL_PROBES.items():
        assert base[key] != expected, f"{name}: the probe already holds at the default"
        got = _unet(ModelConfig(**{"preset": "custom", name: value})).config
        assert got[key] == expected, f"model.{name}={value!r} does not reach the UNet ({key}={got[key]!r})"


def test_custom_starts_from_quickstart_and_num_heads_default_matches_it():
    custom = _unet(ModelConfig(preset="custom")).config
    quick = _unet(ModelConfig()).config
    assert custom == quick and quick["num_heads"] == 2 and ModelConfig().num_heads is None


@pytest.mark.parametrize(("preset", "field", "value"), [("quickstart", "num_heads", 4),
                                                        ("quickstart", "channel_mult", [1, 2]),
                                                        ("ddpm_cifar10", "model_channels", 64)])
def test_a_preset_refuses_a_conflicting_architecture_field(preset, field, value):
    with pytest.raises(ConfigError, match=rf"model\.{field}=.*conflicts with model\.preset='{preset}'"):
        unet_config(ModelConfig(preset=preset, **{field: value}), image_size=32, channels=3, num_classes=10,
                    learn_sigma=False)


def test_a_preset_accepts_its_own_values():
    cfg = unet_config(ModelConfig(preset="ddpm_cifar10", model_channels=128, channel_mult=[1, 2, 2, 2]),
                      image_size=32, channels=3, num_classes=0, learn_sigma=False)
    assert cfg["model_channels"] == 128 and cfg["norm_eps"] == 1e-6  # and its diffusers-compatible extras


def test_shipped_configs_build_without_conflicts():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        cfg = load_config(path)
        unet_config(cfg.model, image_size=cfg.data.image_size, channels=cfg.data.channels, num_classes=10,
                    learn_sigma=cfg.diffusion.learn_sigma)


def test_config_json_stores_the_diffusion_fields_and_rebuilds_the_same_diffusion(tmp_path):
    cfg = DiffusionConfig(noise_schedule="cosine", predict="x0", min_snr_gamma=3.0, diffusion_steps=50)
    unet = build_unet(ModelConfig(preset="custom", model_channels=32, channel_mult=[1]), image_size=8, channels=1,
                      num_classes=0, learn_sigma=False)
    card = {"unet": unet.config, "diffusion": diffusion_card(cfg), "data": {"image_size": 8, "channels": 1}}
    assert set(card["diffusion"]) == set(DiffusionConfig.model_fields)
    sampler = load_model_dir(write_model_dir(tmp_path, unet.state_dict(), card))
    want = build_diffusion(cfg)
    assert sampler.diffusion.config == want.config and torch.equal(sampler.diffusion.betas, want.betas)


def test_a_format_1_model_still_loads(tmp_path):
    import json

    unet = build_unet(ModelConfig(preset="custom", model_channels=32, channel_mult=[1]), image_size=8, channels=1,
                      num_classes=0, learn_sigma=False)
    write_model_dir(tmp_path, unet.state_dict(), {"unet": unet.config, "data": {"image_size": 8, "channels": 1}})
    card = json.loads((tmp_path / "config.json").read_text())
    card.update(format_version=1, diffusion={"timestep_respacing": "", "noise_schedule": "cosine",
                                             "diffusion_steps": 100, "predict_xstart": False, "predict_v": True,
                                             "learn_sigma": False, "sigma_small": False, "use_kl": False,
                                             "rescale_learned_sigmas": False})
    (tmp_path / "config.json").write_text(json.dumps(card))
    d = load_model_dir(tmp_path).diffusion
    assert d.model_mean_type is ModelMeanType.VELOCITY and d.num_timesteps == 100
    assert np.allclose(d.alphas_cumprod.numpy(), _cosine_alpha_bar(100))
