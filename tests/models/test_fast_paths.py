"""Each fast path against the plain one: compiled vs eager, fused vs per-tensor optimizer, the per-device choices,
and the fast defaults reaching diffusers imports. No timings here (benchmarks/perf_suite.py measures speed)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from diffusion_core import GaussianDiffusion, get_named_beta_schedule, sample
from diffusion_core.models import (
    CPU_WARMUP_BATCH_SIZES,
    CompiledUNet,
    UNet,
    autocast_forward,
    compile_options,
    compile_unet,
    cpu_has_native_bf16,
    fast_defaults,
    is_compiled,
    load_diffusers_unet2d,
    optimizer_kwargs,
    train_autocast_dtype,
)
from diffusion_core.models.unet import MaskDropout

from .test_unet import TINY, randomize_


def test_fast_defaults_is_a_flat_loggable_dict_per_device() -> None:
    for dev in ("cpu", "cuda", "mps"):
        d = fast_defaults(dev)
        assert d["device_type"] == dev and all(isinstance(v, (str, bool)) for v in d.values())
        assert d["channels_last"] is True and d["attention"] == "sdpa"
    assert fast_defaults("cpu")["optimizer"] == "fused" and optimizer_kwargs("cpu") == {"fused": True}
    assert optimizer_kwargs("mps") == {"foreach": True}
    assert fast_defaults("cuda")["tf32_matmul"] and not fast_defaults("cpu")["tf32_matmul"]
    # aten's dropout RNG inside compiled graphs on CPU only; a mode's own options are kept
    assert compile_options("cpu") == {"fallback_random": True} and compile_options("cuda") == {}
    assert compile_options("cuda", "max-autotune")["max_autotune"] and "fallback_random" not in compile_options("cuda")
    assert fast_defaults("cpu")["compile_fallback_random"] and not fast_defaults("cuda")["compile_fallback_random"]


def _cpu_probes(monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, amx_fp16: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16)


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [(False, False, None), (True, False, torch.bfloat16),
                                                             (False, True, torch.bfloat16), (True, True, torch.bfloat16)])
def test_cpu_autocast_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, amx, avx512_bf16, expected) -> None:
    _cpu_probes(monkeypatch, amx, avx512_bf16)
    assert cpu_has_native_bf16() is (expected is not None)
    assert train_autocast_dtype("cpu", "bf16") is expected and train_autocast_dtype("cpu") is expected
    assert fast_defaults("cpu")["train_autocast_dtype"] == ("bfloat16" if expected else "float32")
    assert train_autocast_dtype("cpu", "no") is None  # "no" is fp32 everywhere
    assert fast_defaults("cpu", "no")["train_autocast_dtype"] == "float32"
    assert train_autocast_dtype("cpu", "fp16") is None  # no AMX-FP16: fp16 would be emulated
    _cpu_probes(monkeypatch, amx, avx512_bf16, amx_fp16=True)
    assert train_autocast_dtype("cpu", "fp16") is torch.float16


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_cuda_autocast_follows_the_gpus_bf16_support(monkeypatch, bf16_supported) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_supported)
    assert train_autocast_dtype("cuda", "bf16") is (torch.bfloat16 if bf16_supported else None)
    assert train_autocast_dtype("cuda", "fp16") is torch.float16 and train_autocast_dtype("cuda", "no") is None
    assert fast_defaults("cuda", "fp16")["train_autocast_dtype"] == "float16"
    assert train_autocast_dtype("mps", "bf16") is None  # no rule for other devices: fp32
    with pytest.raises(ValueError, match="'no', 'bf16', 'fp16'"):
        train_autocast_dtype("cpu", "fp8")  # type: ignore[arg-type]


def _bf16_vs_fp32_step(seed: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[UNet], set]:
    """One hybrid-loss training step (learned variance: MSE + vb terms) of the same UNet in fp32 and under
    bf16 autocast: losses, gradients, the stepped models and the dtypes the convolutions produced under bf16."""
    d = GaussianDiffusion(betas=get_named_beta_schedule("cosine", 1000), model_mean_type="epsilon",
                          model_var_type="learned_range", loss_type="mse")
    ref = randomize_(UNet(**{**TINY, "out_channels": 6, "num_classes": 3}), seed=seed).train()
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    noise, y = torch.randn(8, 3, 8, 8, generator=g), torch.arange(8) % 3
    losses, grads, models, conv_dtypes = [], [], [], set()
    for dtype in (None, torch.bfloat16):
        m = copy.deepcopy(ref)
        if dtype is not None:
            m.conv_in.register_forward_hook(lambda _m, _i, out: conv_dtypes.add(out.dtype))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, **optimizer_kwargs("cpu"))
        torch.manual_seed(0)  # the same dropout masks (none in TINY) and the same everything else
        terms = d.training_losses(autocast_forward(m, "cpu", dtype), x, t, model_kwargs={"y": y}, noise=noise)
        assert all(v.dtype == torch.float32 for v in terms.values())  # the loss terms are computed in fp32
        loss = terms["loss"].mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        opt.step()
        models.append(m)
    return losses, grads, models, conv_dtypes


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_autocast_training_step_matches_fp32(seed) -> None:
    (l32, l16), (g32, g16), (m32, m16), conv_dtypes = _bf16_vs_fp32_step(seed)
    assert conv_dtypes == {torch.bfloat16}  # the network really ran in bf16
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op). Tolerances: loss 1%, gradient 2% (relative
    # L2 over all parameters) and cosine >= 0.999; measured: loss <= 0.1%, gradient 0.3-0.7%, cosine 0.99998.
    assert float((l16 - l32).abs() / l32) < 1e-2
    assert l16 != l32  # ... and so it is not bit-identical to fp32
    flat32 = torch.cat([v.flatten() for v in g32.values()])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    assert float((flat16 - flat32).norm() / flat32.norm()) < 2e-2
    assert float(F.cosine_similarity(flat16, flat32, dim=0)) > 0.999
    assert all(g.dtype == torch.float32 for g in g16.values())  # master weights and gradients stay fp32
    start = randomize_(UNet(**{**TINY, "out_channels": 6, "num_classes": 3}), seed=seed).state_dict()
    for name, p in m16.named_parameters():  # the step ran and moved every parameter with a nonzero gradient
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        if g16[name].abs().max() > 0:
            assert not torch.equal(p.detach(), start[name]), name


def test_autocast_forward_with_no_dtype_is_the_model_itself() -> None:
    model = UNet(**TINY)
    assert autocast_forward(model, "cpu", None) is model
    x, t = torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    assert autocast_forward(model, "cpu", torch.bfloat16)(x, t).dtype == torch.float32


def test_unet_and_diffusers_import_default_to_channels_last() -> None:
    diffusers = pytest.importorskip("diffusers")
    ours = UNet(**TINY)
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    theirs = diffusers.UNet2DModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1,
                                   down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                                   norm_num_groups=8)
    loaded = load_diffusers_unet2d(theirs.state_dict(), theirs.config)
    assert loaded.config["channels_last"] and loaded.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # the loaded weights are unchanged by the layout (state_dict values equal the diffusers ones)
    assert torch.equal(loaded.conv_in.weight, theirs.conv_in.weight)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("scale_shift", [False, True])
def test_in_place_inference_equals_the_out_of_place_forward(dtype, scale_shift) -> None:
    """Without autograd the ResBlocks' SiLUs and residual adds run in place on their own fresh outputs: the same
    bits as with grad on (out of place), and the caller's input is left untouched."""
    cfg = {**TINY, "num_classes": 3, "use_scale_shift_norm": scale_shift, "resblock_updown": scale_shift}
    model = randomize_(UNet(**cfg)).eval()
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([5, 700]), torch.tensor([0, 2])
    x_before = x.clone()
    run = autocast_forward(model, "cpu", dtype)
    with torch.enable_grad():
        x_grad = x.clone().requires_grad_()
        reference = run(x_grad, t, y=y).detach()
    with torch.inference_mode():
        fast = run(x, t, y=y)
    with torch.no_grad():
        fast_no_grad = run(x, t, y=y)
    assert torch.equal(fast, reference) and torch.equal(fast_no_grad, reference)
    assert torch.equal(x, x_before)


def _adamw_steps(model: UNet, kwargs: dict, steps: int = 3) -> dict[str, torch.Tensor]:
    """AdamW steps fed the same gradient sequence (the first is the model's real gradient, then fixed draws),
    so the comparison is about the optimizer kernels, not chaotic training dynamics."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, **kwargs)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)
    model(x, t).square().mean().backward()
    for p in model.parameters():  # autograd keeps each gradient in its parameter's layout (channels_last too)
        assert p.grad.stride() == p.stride()
    for _ in range(steps):
        opt.step()
        for p in model.parameters():
            # same layout as the parameter, as autograd makes it: torch's fused CPU AdamW (2.13) pairs
            # parameter and gradient by storage order, and silently mixes elements up if their strides differ
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g) * 1e-3)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fused_adamw_matches_the_per_tensor_loop() -> None:
    ref = randomize_(UNet(**TINY))
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    fused = copy.deepcopy(ref)
    a = _adamw_steps(ref, {"foreach": False})
    b = _adamw_steps(fused, optimizer_kwargs("cpu"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # the parameters did move


@pytest.fixture(scope="module")
def compiled_pair():
    torch._dynamo.reset()
    eager = randomize_(UNet(**{**TINY, "num_classes": 3})).eval()
    comp = compile_unet(copy.deepcopy(eager), warmup_batch_sizes=CPU_WARMUP_BATCH_SIZES)
    return eager, comp


@pytest.mark.slow
def test_compiled_forward_matches_eager_without_recompiles(compiled_pair) -> None:
    from torch._dynamo.utils import counters

    eager, comp = compiled_pair
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the warm-up compiled
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in (3, 5, 1, 7, 2, 17, 32):  # new batch sizes: the warmed-up graphs serve them all
            x, t, y = torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g), torch.arange(b) % 3
            torch.testing.assert_close(comp(x, t, y), eager(x, t, y), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch size recompiled"
    assert isinstance(comp, CompiledUNet) and is_compiled(comp) and not is_compiled(eager)
    assert list(comp.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix
    assert comp.config == eager.config and comp.num_classes == 3


@pytest.mark.slow
def test_compiled_and_eager_samples_agree(compiled_pair) -> None:
    from torch._dynamo.utils import counters

    eager, comp = compiled_pair
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type="epsilon",
                          model_var_type="fixed_small", loss_type="mse")
    graphs = counters["stats"]["unique_graphs"]
    kw = dict(sampler="ddim", steps=10, model_kwargs={"y": torch.tensor([0, 1, 2, 0])},
              noise=torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    a = sample(d, eager, (4, 3, 8, 8), **kw)
    b = sample(d, comp, (4, 3, 8, 8), **kw)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "sampling steps recompiled"


@pytest.mark.slow
def test_compiled_training_step_matches_eager() -> None:
    torch._dynamo.reset()
    eager = randomize_(UNet(**TINY))
    comp = compile_unet(copy.deepcopy(eager))
    g = torch.Generator().manual_seed(0)
    grads = []
    for m in (eager, comp):
        m.train()
        m.zero_grad(set_to_none=True)
        x, t = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)
        F.mse_loss(m(x, t), torch.zeros_like(x)).backward()
        grads.append({n: p.grad.clone() for n, p in (m.unet if m is comp else m).named_parameters()})
        g = torch.Generator().manual_seed(0)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.slow
def test_compiled_dropout_matches_eager() -> None:
    """Inside a compiled graph (aten's RNG on CPU, ``compile_options``) the mask is the eager one, forward and back."""
    torch._dynamo.reset()
    drop = MaskDropout(0.1)
    comp = torch.compile(drop, options=compile_options("cpu"))
    x = torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last).bfloat16()
    outs = []
    for m in (drop, comp):
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        y = m(xi)
        y.float().square().sum().backward()
        outs.append((y.float(), xi.grad.float()))
    (y0, g0), (y1, g1) = outs
    assert torch.equal(y0 == 0, y1 == 0), "compiled dropout drew a different mask"
    torch.testing.assert_close(y1, y0, atol=0, rtol=2**-7)  # bf16: the scale may round before or after the product
    torch.testing.assert_close(g1, g0, atol=0, rtol=2**-6)
