"""Our UNet vs diffusers' UNet2DModel (independent implementation) with the same random weights."""

import pytest
import torch

from diffusion_core.models import DDPM_CIFAR10_DIFFUSERS_CONFIG, UNet, load_diffusers_unet2d
from diffusion_core.models.diffusers_convert import unet_config_from_diffusers

diffusers = pytest.importorskip("diffusers")

DDPM_CIFAR10 = DDPM_CIFAR10_DIFFUSERS_CONFIG  # the published google/ddpm-cifar10-32 config

# A small config exercising the other code paths: diffusers defaults for the sinusoid and padding,
# multi-head attention at two resolutions, fewer groups, class embeddings.
SMALL = {
    "sample_size": 16,
    "in_channels": 2,
    "out_channels": 4,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": 16,
    "norm_num_groups": 8,
    "num_class_embeds": 5,
}


def _diffusers_model(cfg: dict, seed: int = 0) -> "diffusers.UNet2DModel":
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**cfg).eval()
    with torch.no_grad():  # make the (non-zero) defaults less tame: perturb norms and biases too
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _max_diff(ours: UNet, theirs, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> float:
    with torch.no_grad():
        ref = theirs(x, t, class_labels=y).sample
        out = ours.eval()(x, t, y)
    assert out.shape == ref.shape
    return float((out - ref).abs().max())


def test_ddpm_cifar10_parity() -> None:
    theirs = _diffusers_model(DDPM_CIFAR10)
    assert sum(p.numel() for p in theirs.parameters()) == 35_746_307
    ours = load_diffusers_unet2d(theirs.state_dict(), theirs.config)
    # the preset *is* the converted architecture (the published inference config omits the 0.1 train dropout)
    assert {**ours.config, "dropout": 0.1} == UNet.ddpm_cifar10().config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    assert _max_diff(ours, theirs, x, t) <= 1e-4


def test_small_config_parity_class_conditional() -> None:
    theirs = _diffusers_model(SMALL, seed=3)
    ours = load_diffusers_unet2d(theirs.state_dict(), theirs.config)
    assert ours.config["num_classes"] == 5 and ours.config["head_channels"] == 16
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 16, 16, generator=g)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([0, 4, 2])
    assert _max_diff(ours, theirs, x, t, y) <= 1e-4
    # the appended null label has a zero embedding == "no class embedding"
    assert torch.count_nonzero(ours.label_embed.weight[5]) == 0


def test_load_from_safetensors_bin_and_folder(tmp_path) -> None:
    from safetensors.torch import save_file

    theirs = _diffusers_model(SMALL, seed=4)
    sd = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.bin")
    theirs.save_pretrained(tmp_path / "folder")
    x, t, y = torch.randn(2, 2, 16, 16), torch.tensor([5, 600]), torch.tensor([1, 3])
    models = [
        load_diffusers_unet2d(tmp_path / "w.safetensors", dict(theirs.config)),
        load_diffusers_unet2d(str(tmp_path / "w.bin"), theirs.config),
        load_diffusers_unet2d(tmp_path / "folder"),
        load_diffusers_unet2d(tmp_path / "w.safetensors", tmp_path / "folder" / "config.json"),
    ]
    for ours in models:
        assert _max_diff(ours, theirs, x, t, y) <= 1e-4


def test_legacy_attention_key_names() -> None:
    theirs = _diffusers_model(SMALL, seed=5)
    legacy = {}
    for k, v in theirs.state_dict().items():
        for new, old in (
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ):
            k = k.replace(new, old)
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    ours = load_diffusers_unet2d(legacy, theirs.config)
    assert _max_diff(ours, theirs, torch.randn(1, 2, 16, 16), torch.tensor([10]), torch.tensor([1])) <= 1e-4


def test_rejects_mismatched_or_unsupported() -> None:
    theirs = _diffusers_model(SMALL, seed=6)
    sd = dict(theirs.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected diffusers keys"):
        load_diffusers_unet2d(sd, theirs.config)
    with pytest.raises(NotImplementedError, match="resnet_time_scale_shift"):
        unet_config_from_diffusers({**SMALL, "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(NotImplementedError, match="not mirrored"):
        unet_config_from_diffusers({**SMALL, "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")})
    with pytest.raises(NotImplementedError, match="up block type"):
        unet_config_from_diffusers(
            {**SMALL, "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")}
        )
