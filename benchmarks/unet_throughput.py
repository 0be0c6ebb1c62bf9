"""Throughput of our UNet vs diffusers' UNet2DModel at the identical google/ddpm-cifar10-32 configuration.

Both models hold the same weights (ours is converted from the diffusers one), run in one process with the same
thread count, and are timed in interleaved rounds (A B A B ...) so that machine-load drift hits both alike.
Measured: a training step (forward + MSE backward + Adam step, train mode, dropout 0.1) and an inference forward
(eval, ``torch.inference_mode``). Reported: images/s (median over rounds), ratio ours/diffusers, achieved GFLOP/s
(model FLOPs counted with ``torch.utils.flop_counter`` plus the attention matmuls it does not see on CPU) and,
on a GPU with ``--peak-tflops`` (defaults to H100 dense bf16), model-FLOPs utilisation.

    python benchmarks/unet_throughput.py                       # CPU, batch 16, fp32
    python benchmarks/unet_throughput.py --device cuda --dtype bf16 --compile --batch-size 256

Variants: ``ours`` (default options, channels_last since issue 14), ``ours_contiguous`` (``channels_last=False``),
``diffusers`` (as shipped) and ``diffusers_cl`` (diffusers converted to channels_last, for an apples-to-apples view
of that option). Every variant uses the same plain Adam, so this compares the networks only;
``benchmarks/perf_suite.py`` compares the defaults end to end (fused AdamW included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Four variants x (fwd, bwd-data, bwd-weights, reorders) overflow oneDNN's default cache of 1024 primitives,
# which would make every step re-JIT its kernels; must be set before torch loads oneDNN.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_core.models import DDPM_CIFAR10_DIFFUSERS_CONFIG, UNet, load_diffusers_unet2d  # noqa: E402
from diffusion_core.models.unet import AttentionBlock  # noqa: E402

DDPM_CIFAR10 = {**DDPM_CIFAR10_DIFFUSERS_CONFIG, "dropout": 0.1}  # Ho et al. train with dropout 0.1
VARIANTS = ("ours", "ours_contiguous", "diffusers", "diffusers_cl")
H100_BF16_DENSE_TFLOPS = 989.0


def count_flops(model: UNet) -> tuple[float, float]:
    """(forward, forward+backward) model FLOPs per image, counted on a batch of 1 in float32 on CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    attn = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: attn.append(inp[0].shape))
             for m in model.modules() if isinstance(m, AttentionBlock)]  # fmt: skip
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    with FlopCounterMode(display=False) as fwd:
        model(x, t)
    with FlopCounterMode(display=False) as both:
        model(x, t).square().mean().backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    # q k^T and attn v: 2 matmuls of 2*N*N*C FLOPs each (the CPU flash kernel is not seen by the counter);
    # the backward of attention costs twice its forward (standard model-FLOPs accounting, no recompute).
    attn_fwd = sum(4 * s[2] * s[3] * s[2] * s[3] * s[1] for s in attn[: len(attn) // 2])
    return fwd.get_total_flops() + attn_fwd, both.get_total_flops() + 3 * attn_fwd


def build(variant: str, reference: Any, device: torch.device, compile_: bool) -> tuple[torch.nn.Module, bool]:
    """Return (module, is_diffusers) for a variant; all share the reference weights."""
    if variant.startswith("ours"):
        model = load_diffusers_unet2d(
            reference.state_dict(), reference.config, channels_last=variant != "ours_contiguous"
        )
        diff = False
    else:
        from diffusers import UNet2DModel

        model = UNet2DModel(**DDPM_CIFAR10)
        model.load_state_dict(reference.state_dict())
        if variant == "diffusers_cl":
            model = model.to(memory_format=torch.channels_last)
        diff = True
    model = model.to(device)
    if compile_:
        model = torch.compile(model)
    return model, diff


def make_steps(
    model: torch.nn.Module, diff: bool, args: argparse.Namespace, device: torch.device
) -> dict[str, Callable[[], None]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    b = args.batch_size
    x = torch.randn(b, 3, 32, 32, generator=g).to(device)
    if args.variant_input_cl and diff:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    target = torch.randn(b, 3, 32, 32, generator=g).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    amp = args.dtype == "bf16"

    def fwd() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x, t)
            return out.sample if diff else out

    def train() -> None:
        model.train()
        loss = F.mse_loss(fwd().float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            fwd()

    return {"train": train, "infer": infer}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast mixed precision"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--modes", default="train,infer")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="for MFU (default: H100 dense bf16 on cuda)"
    )
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/unet_throughput_<dev>.json)"
    )
    args = p.parse_args(argv)
    args.variant_input_cl = True  # diffusers_cl also gets a channels_last input (ours converts inside)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from diffusers import UNet2DModel
    from diffusers import __version__ as diffusers_version

    torch.manual_seed(0)
    reference = UNet2DModel(**DDPM_CIFAR10)
    fwd_flops, train_flops = count_flops(load_diffusers_unet2d(reference.state_dict(), reference.config))
    runs = {}
    for v in variants:
        model, diff = build(v, reference, device, args.compile)
        runs[v] = make_steps(model, diff, args, device)
    load_before = os.getloadavg()

    results: dict[str, dict[str, list[float]]] = {m: {v: [] for v in variants} for m in modes}
    for mode in modes:
        for v in variants:  # warm-up (and compilation) outside the timed rounds
            for _ in range(args.warmup):
                runs[v][mode]()
            sync(device)
        for _ in range(args.rounds):
            for v in variants:
                sync(device)
                start = time.perf_counter()
                for _ in range(args.iters):
                    runs[v][mode]()
                sync(device)
                results[mode][v].append(args.batch_size * args.iters / (time.perf_counter() - start))

    peak = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    table = []
    for mode in modes:
        flops = train_flops if mode == "train" else fwd_flops
        med = {v: statistics.median(results[mode][v]) for v in variants}
        best = {v: max(results[mode][v]) for v in variants}
        for v in variants:
            has_base = "diffusers" in variants
            row = {
                "mode": mode,
                "variant": v,
                "images_per_s": med[v],
                "images_per_s_best": best[v],
                "images_per_s_all_rounds": results[mode][v],
                "ratio_vs_diffusers": med[v] / med["diffusers"] if has_base else None,
                "ratio_vs_diffusers_best": best[v] / best["diffusers"] if has_base else None,
                "gflop_per_s": med[v] * flops / 1e9,
                "gflop_per_s_best": best[v] * flops / 1e9,
                "mfu": med[v] * flops / (peak * 1e12) if peak else None,
            }
            table.append(row)

    print(
        f"\nUNet throughput, ddpm-cifar10-32 config, device={device}, dtype={args.dtype}, compile={args.compile}, "
        f"batch={args.batch_size}, threads={torch.get_num_threads()}, rounds={args.rounds}x{args.iters} iters"
    )
    print(
        f"model FLOPs/image: forward {fwd_flops / 1e9:.2f} G, train step (fwd+bwd) {train_flops / 1e9:.2f} G"
    )
    print(
        f"{'mode':6s} {'variant':13s} {'img/s med':>9s} {'img/s best':>10s} {'ratio med':>9s} {'ratio best':>10s}"
        f" {'GFLOP/s':>8s}" + (f" {'MFU':>6s}" if peak else "")
    )
    for r in table:
        ratios = [f"{r[k]:.3f}" if r[k] else "-" for k in ("ratio_vs_diffusers", "ratio_vs_diffusers_best")]
        mfu = f" {100 * r['mfu']:5.1f}%" if peak else ""
        print(
            f"{r['mode']:6s} {r['variant']:13s} {r['images_per_s']:9.2f} {r['images_per_s_best']:10.2f} "
            f"{ratios[0]:>9s} {ratios[1]:>10s} {r['gflop_per_s']:8.1f}{mfu}"
        )

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "compile": args.compile,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "fwd_gflop_per_image": fwd_flops / 1e9,
        "train_gflop_per_image": train_flops / 1e9,
        "peak_tflops": peak,
        "onednn_primitive_cache_capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
        "note": "CPU runs share 2 cores with other jobs: wall-clock numbers are noisy; variants are interleaved "
        "per round; median and best (least-disturbed) round are reported, images_per_s_all_rounds keeps all.",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": table,
    }
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent / "results" / f"unet_throughput_{device.type}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
