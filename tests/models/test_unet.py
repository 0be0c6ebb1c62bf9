"""UNet contract: shapes, presets, config round trip, class dropout, checkpointing, memory format, autocast."""

import json

import pytest
import torch

from diffusion_core.models import UNet
from diffusion_core.models.unet import MaskDropout, keep_mask

TINY = {
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (4,),
    "image_size": 8,
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite the zero-initialised layers so that every parameter influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5) + (p.ndim == 1) * 0.1
            )
    return model


@pytest.mark.parametrize(
    "overrides, size",
    [
        ({}, 8),
        ({"learn_sigma": True}, 8),
        ({"num_classes": 5}, 8),
        ({"num_classes": 5, "learn_sigma": True, "use_scale_shift_norm": True}, 8),
        (
            {
                "resblock_updown": True,
                "channel_mult": (1, 2, 2),
                "image_size": 16,
                "attention_resolutions": (8, 4),
            },
            16,
        ),
        ({"in_channels": 1, "out_channels": 1, "head_channels": 16, "downsample_padding": "asymmetric"}, 8),
        ({"image_size": 12, "attention_resolutions": (6,)}, 12),
    ],
)
def test_shape_contract(overrides: dict, size: int) -> None:
    cfg = {**TINY, **overrides}
    model = UNet(**cfg).eval()
    b = 3
    x = torch.randn(b, cfg["in_channels"], size, size)
    t = torch.randint(0, 1000, (b,))
    y = torch.randint(0, cfg["num_classes"], (b,)) if cfg.get("num_classes") else None
    out = model(x, t, y=y)
    mult = 2 if cfg.get("learn_sigma") else 1
    assert out.shape == (b, cfg["out_channels"] * mult, size, size)
    assert torch.isfinite(out).all()


def test_output_layer_is_zero_initialised_and_scalar_t_broadcasts() -> None:
    model = UNet(**TINY).eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.count_nonzero(model(x, 10)) == 0  # zero-init out conv (Ho et al. 2020)
    randomize_(model)
    torch.testing.assert_close(model(x, torch.tensor(10)), model(x, torch.tensor([10, 10])))


def test_ddpm_cifar10_parameter_count_and_forward() -> None:
    model = UNet.ddpm_cifar10()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 32, 32), torch.tensor([500]))
    assert out.shape == (1, 3, 32, 32)


def test_quickstart_preset_size() -> None:
    model = UNet.quickstart(image_size=16, in_channels=1, num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n <= 3_000_000
    out = model.eval()(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), y=torch.tensor([3, 10]))
    assert out.shape == (2, 1, 16, 16)


def test_config_round_trip_is_json_and_rebuilds_identically() -> None:
    model = randomize_(UNet(**{**TINY, "num_classes": 4, "learn_sigma": True, "class_dropout_prob": 0.1}))
    cfg = json.loads(json.dumps(model.config))
    assert cfg == model.config
    for rebuilt in (UNet.from_config(cfg), UNet(**cfg)):
        rebuilt.load_state_dict(model.state_dict())
        assert rebuilt.config == model.config
        x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 7]), torch.tensor([0, 4])
        torch.testing.assert_close(rebuilt.eval()(x, t, y), model.eval()(x, t, y), atol=0, rtol=0)
    # config is a copy: mutating it does not touch the model
    model.config["model_channels"] = 999
    assert model.config["model_channels"] == 32


def test_from_config_accepts_pydantic_like_objects() -> None:
    class Cfg:
        def model_dump(self) -> dict:
            return dict(TINY)

    assert UNet.from_config(Cfg()).config["model_channels"] == 32


def test_class_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = randomize_(UNet(**{**TINY, "num_classes": 3, "class_dropout_prob": 0.5}))
    x = torch.randn(64, 3, 8, 8)
    t = torch.full((64,), 5)
    y = torch.zeros(64, dtype=torch.long)
    null = torch.full_like(y, 3)
    model.eval()
    cond, uncond = model(x, t, y), model(x, t, null)
    torch.testing.assert_close(model(x, t, y), cond, atol=0, rtol=0)  # eval: deterministic, no dropout
    torch.testing.assert_close(model(x, t), uncond, atol=0, rtol=0)  # y=None -> null label
    model.train()
    with torch.no_grad():
        out = model(x, t, y)
    is_cond = (out - cond).flatten(1).abs().amax(1) < 1e-5
    is_null = (out - uncond).flatten(1).abs().amax(1) < 1e-5
    assert bool((is_cond ^ is_null).all())  # every row is exactly one of the two
    assert 10 <= int(is_null.sum()) <= 54  # ~Binomial(64, 0.5)


def test_label_errors() -> None:
    with pytest.raises(ValueError):
        UNet(**TINY)(torch.randn(1, 3, 8, 8), torch.tensor([1]), y=torch.tensor([0]))
    with pytest.raises(ValueError):
        UNet(**{**TINY, "class_dropout_prob": 0.1})


def test_gradient_checkpointing_same_grads() -> None:
    cfg = {**TINY, "num_classes": 3, "dropout": 0.2, "class_dropout_prob": 0.3, "use_scale_shift_norm": True}
    ref = randomize_(UNet(**cfg)).train()
    ckpt = UNet(**{**cfg, "use_checkpoint": True}).train()
    ckpt.load_state_dict(ref.state_dict())
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 1])
    grads = []
    for model in (ref, ckpt):
        torch.manual_seed(123)  # same dropout masks in both runs
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    ref.set_gradient_checkpointing(True)
    assert ref.config["use_checkpoint"] is True


def test_channels_last_matches_contiguous() -> None:
    model = randomize_(UNet(**{**TINY, "num_classes": 2, "channels_last": False})).eval()
    assert model.conv_in.weight.is_contiguous()
    cl = UNet(**{**TINY, "num_classes": 2}).eval()  # channels_last is the default
    cl.load_state_dict(model.state_dict())
    assert cl.config["channels_last"] and cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 900]), torch.tensor([0, 1])
    torch.testing.assert_close(cl(x, t, y), model(x, t, y), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_and_half_model_are_finite() -> None:
    model = randomize_(UNet(**TINY)).eval()
    x, t = torch.randn(2, 3, 8, 8) * 10, torch.tensor([1, 999])
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    half = model.to(torch.bfloat16)
    out = half(x.bfloat16(), t)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.7])  # 0.7 rounds down in float32, 0.1 and 0.3 up
def test_keep_mask_is_u_at_least_p_exactly(p: float) -> None:
    pf = torch.tensor(p, dtype=torch.float32)
    edges = torch.stack([torch.tensor(0.0), torch.nextafter(pf, torch.tensor(0.0)), pf,
                         torch.nextafter(pf, torch.tensor(1.0)), torch.tensor(0.5), torch.tensor(1.0 - 2**-24)])
    u = torch.cat([edges, torch.rand(10_000, generator=torch.Generator().manual_seed(0))])
    m = keep_mask(u.clone(), p)  # p as a Python float, as MaskDropout passes it
    assert m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(m, (u >= p).float(), atol=0, rtol=0)  # u == p is kept, its neighbour below is not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_dropout_is_inverted_dropout_with_the_uniform_draw(dtype: torch.dtype) -> None:
    drop = MaskDropout(0.3)
    x = torch.randn(4, 8, 16, 16).to(dtype).requires_grad_()
    torch.manual_seed(7)
    out = drop(x)
    torch.manual_seed(7)
    keep = (torch.rand(x.shape) >= 0.3).to(dtype)  # the same draw: x * [u >= p] / (1 - p)
    torch.testing.assert_close(out, x * keep.mul_(1 / 0.7), atol=0, rtol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, keep, atol=0, rtol=0)  # backward is one multiply by the scaled mask
    assert drop.eval()(x) is x


def test_mask_dropout_keeps_1_minus_p_and_the_mean() -> None:
    x = torch.ones(1_000_000)
    torch.manual_seed(0)
    out = MaskDropout(0.3)(x)
    kept = (out != 0).double().mean().item()
    assert abs(kept - 0.7) < 5 * (0.21 / x.numel()) ** 0.5  # Bernoulli(0.7): 5 standard errors
    assert abs(out.double().mean().item() - 1.0) < 5 * (0.3 / 0.7 / x.numel()) ** 0.5  # E[m / (1 - p)] = 1
