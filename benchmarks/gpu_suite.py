"""The GPU suite's measurements (driven by ``benchmarks/gpu_suite.sh``); needs only torch, numpy and diffusion_core.

1. DDPM CIFAR-10 UNet (35.7M parameters) training step in the core's training autocast dtype
   (``train_autocast_dtype``: bf16 on CUDA and on CPUs with AMX / AVX512-BF16) (forward + MSE backward + fused AdamW),
   eager vs compiled, batch 128 and 256 (``--quick``: 2): images/s and MFU = achieved model FLOP/s over the
   chip's dense bf16 peak (H200 / H100 SXM: 989 TFLOP/s). FLOPs are counted once with
   ``torch.utils.flop_counter`` (plus the attention matmuls the CPU kernel hides from it). Also channels_last
   off vs on (eager), the per-device choice of ``fast_defaults`` checked on this device.
2. DDIM-20 sampling images/s vs batch size 1, 2, 4, ..., 256 (``--quick``: 1, 2), eager vs compiled (one dynamic
   batch graph, built before timing); bf16 autocast on CUDA, fp32 on CPU.
3. With diffusers importable: diffusers' UNet2DModel bf16 training step (as shipped, eager) at the first batch,
   for the ratio.

The compile warm-up is never timed. Writes ``gpu_suite_<device>.json`` into the output folder.
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

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from unet_throughput import count_flops  # noqa: E402

from diffusion_core import GaussianDiffusion, get_named_beta_schedule, sample  # noqa: E402
from diffusion_core.models import (  # noqa: E402
    CPU_WARMUP_BATCH_SIZES,
    DDPM_CIFAR10_DIFFUSERS_CONFIG,
    UNet,
    compile_unet,
    fast_defaults,
    optimizer_kwargs,
    train_autocast_dtype,
)

PEAK_BF16_DENSE_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}
# --quick on CPU: a small UNet so the whole suite stays well under a minute
QUICK_UNET = {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_resolutions": (16,),
              "image_size": 32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, iters: int, rounds: int) -> list[float]:
    """Seconds per call, one value per round of `iters` calls (after one untimed call)."""
    fn()
    sync(device)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) / iters)
    return out


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_DENSE_TFLOPS.items() if k in name), None)


def build_unet(args: argparse.Namespace, **overrides: Any) -> UNet:
    torch.manual_seed(0)
    cfg = {**QUICK_UNET, **overrides} if args.quick else overrides
    return UNet.ddpm_cifar10(**cfg)


def _autocast(device: torch.device) -> torch.autocast:
    """The training autocast of the core's per-device rule (disabled where it resolves to fp32)."""
    dtype = train_autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def train_section(args: argparse.Namespace, device: torch.device, peak: float | None) -> list[dict[str, Any]]:
    fwd_flops, train_flops = count_flops(build_unet(args))
    rows = []
    variants = [("eager", True, False), ("eager_contiguous", False, False)]
    if args.compile:
        variants.append(("compiled", True, True))
    for name, channels_last, compiled in variants:  # one model per variant: one compilation serves all batches
        unet = build_unet(args, channels_last=channels_last).to(device)
        model = compile_unet(unet) if compiled else unet
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, **optimizer_kwargs(device))
        model.train()
        for batch in args.train_batches:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
            t = torch.randint(0, 1000, (batch,), generator=g).to(device)
            target = torch.randn(batch, 3, 32, 32, generator=g).to(device)

            def step(model=model, opt=opt, x=x, t=t, target=target) -> None:
                with _autocast(device):
                    loss = F.mse_loss(model(x, t).float(), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            t0 = time.perf_counter()
            for _ in range(2):  # warm-up: compilation, cuDNN autotuning, allocator
                step()
            sync(device)
            warm = time.perf_counter() - t0
            secs = timed(step, device, args.iters, args.rounds)
            ips = batch / statistics.median(secs)
            row = {"what": "train", "variant": name, "batch": batch, "images_per_s": ips,
                   "autocast_dtype": fast_defaults(device)["train_autocast_dtype"],
                   "tflop_per_s": ips * train_flops / 1e12, "mfu": ips * train_flops / (peak * 1e12) if peak else None,
                   "warmup_s": warm, "seconds_per_step_all_rounds": secs}
            rows.append(row)
            print(f"[train] b{batch} {name:16s} {ips:10.1f} img/s  {row['tflop_per_s']:7.2f} TFLOP/s"
                  + (f"  MFU {100 * row['mfu']:.1f}%" if peak else "") + f"  (warm-up {warm:.0f}s)", flush=True)
        del model, unet, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.diffusers:
        rows.extend(diffusers_train(args, device, train_flops, peak))
    return rows


def diffusers_train(args: argparse.Namespace, device: torch.device, train_flops: float,
                    peak: float | None) -> list[dict[str, Any]]:
    try:
        from diffusers import UNet2DModel
    except ImportError as e:  # the GPU machine may lack it: the rest of the suite does not need it
        print(f"[train] diffusers not importable ({e}); skipping its row", flush=True)
        return []
    if args.quick:
        return []
    batch = args.train_batches[0]
    torch.manual_seed(0)
    model = UNet2DModel(**{**DDPM_CIFAR10_DIFFUSERS_CONFIG, "dropout": 0.1}).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with _autocast(device):
            loss = F.mse_loss(model(x, t).sample.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    secs = timed(step, device, args.iters, args.rounds)
    ips = batch / statistics.median(secs)
    print(f"[train] b{batch} diffusers        {ips:10.1f} img/s", flush=True)
    return [{"what": "train", "variant": "diffusers_as_shipped", "batch": batch, "images_per_s": ips,
             "tflop_per_s": ips * train_flops / 1e12, "mfu": ips * train_flops / (peak * 1e12) if peak else None,
             "seconds_per_step_all_rounds": secs}]


def sampling_section(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    amp = device.type == "cuda"
    diffusion = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type="epsilon",
                                  model_var_type="fixed_small", loss_type="mse")
    unet = build_unet(args, dropout=0.0).to(device).eval()
    variants = {"eager": unet}
    if args.compile:
        t0 = time.perf_counter()
        warm = CPU_WARMUP_BATCH_SIZES if device.type == "cpu" else (1, 2)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            variants["compiled"] = compile_unet(unet, warmup_batch_sizes=warm)
        print(f"[sample] compiled (warm-up batches {warm}) in {time.perf_counter() - t0:.0f}s", flush=True)
    graphs_after_warmup = _graphs()
    rows = []
    for batch in args.sample_batches:
        for name, model in variants.items():
            noise = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).to(device)

            def run(model=model, noise=noise) -> torch.Tensor:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    return sample(diffusion, model, noise.shape, sampler="ddim", steps=20, noise=noise)

            secs = timed(run, device, 1, args.sample_rounds)
            ips = batch / statistics.median(secs)
            rows.append({"what": "ddim20", "variant": name, "batch": batch, "images_per_s": ips,
                         "seconds_all_rounds": secs})
            print(f"[sample] ddim-20 b{batch:<4d} {name:9s} {ips:10.1f} img/s", flush=True)
        if "compiled" in variants:  # compiled and eager agree (bf16 autocast on CUDA: a loose bound)
            noise = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                a = sample(diffusion, unet, noise.shape, sampler="ddim", steps=20, noise=noise)
                b = sample(diffusion, variants["compiled"], noise.shape, sampler="ddim", steps=20, noise=noise)
            rows[-1]["max_abs_diff_vs_eager"] = float((a.float() - b.float()).abs().max())
    if "compiled" in variants:  # graphs dynamo built after the warm-up: 0 means no recompiles across batch sizes
        rows.append({"what": "ddim20_recompiles_after_warmup", "variant": "compiled",
                     "new_graphs": _graphs() - graphs_after_warmup})
        print(f"[sample] graphs compiled after the warm-up: {rows[-1]['new_graphs']}", flush=True)
    return rows


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny UNet, batch 2, few rounds (CPU smoke run)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled rows (default: on, off with --quick)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by name)")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.compile is None:
        args.compile = not args.quick
    args.train_batches = [2] if args.quick else [128, 256]
    args.sample_batches = [1, 2] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    args.iters, args.rounds, args.sample_rounds = (1, 2, 2) if args.quick else (5, 5, 3)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast_defaults(device)["tf32_matmul"]
        torch.backends.cudnn.benchmark = True
    peak = peak_tflops(device, args.peak_tflops)
    t_start, load_before = time.perf_counter(), os.getloadavg()
    train = train_section(args, device, peak)
    sampling = sampling_section(args, device)
    report = {
        "benchmark": "gpu_suite (issue 14)",
        "command": " ".join(["gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "quick": args.quick, "compile": args.compile, "torch": torch.__version__,
        "cuda": torch.version.cuda, "peak_bf16_dense_tflops": peak, "fast_defaults": fast_defaults(device),
        "model": "ddpm_cifar10 (35.7M)" if not args.quick else f"ddpm_cifar10 with {QUICK_UNET}",
        "amp": {"train": fast_defaults(device)["train_autocast_dtype"],
                "sampling": "bfloat16" if device.type == "cuda" else "float32"},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "wall_s": time.perf_counter() - t_start,
        "train": train, "sampling": sampling,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"gpu_suite_{device.type}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['wall_s']:.0f}s)")
    return report


if __name__ == "__main__":
    main()
