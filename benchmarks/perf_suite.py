"""Everything in issue 14's table, measured side by side in one process: ours vs diffusers with the same weights.

Each side runs as a user gets it by default, and the two are timed in interleaved rounds (A B A B ...) so machine
load drifts hit both alike; medians are reported, every round is kept in the JSON with the load average. A
training or inference ratio comes twice: ``ratio``, of the two sides' medians, and ``paired``, the median of the
per-round ratios (steadier when the machine changes speed during the run).

1. Training step, ddpm-cifar10-32 config (35.7M parameters, dropout 0.1), batch 8 and 16: forward + MSE
   backward + AdamW step. ``ours`` = what a user gets by default: our UNet's defaults (channels_last) +
   ``optimizer_kwargs`` (fused AdamW) + autocast in ``train_autocast_dtype("cpu")`` (bf16 on CPUs with AMX /
   AVX512-BF16, else fp32); ``ours_fp32`` = the same in fp32 (train.mixed_precision=no); ``ours_plain_opt`` =
   ``ours`` with a default AdamW (the optimizer's share of the gain); ``diffusers`` = ``UNet2DModel`` as shipped
   (fp32) + default AdamW; ``diffusers_best`` = diffusers at its best: channels_last + fused AdamW + the same
   autocast as ours; ``diffusers_best_fp32`` = channels_last + fused in fp32. With ``--compile`` also
   ``ours_compiled`` / ``diffusers_compiled`` (each best option, the default autocast, + compile). The loss is
   fp32 in every variant. Inference forward (eval, inference_mode, fp32 as sampling runs) at the largest batch.
2. Sampling with a small DDPM UNet (same weights both sides, same x_T and generator): DDIM-20 and DDPM (evenly
   spaced steps, fed to diffusers as custom timesteps) against diffusers' own scheduler loop
   (``for t in scheduler.timesteps: scheduler.step(unet(x, t).sample, t, x)``), batch 1 and 16; the images are
   compared (max |difference|).
3. Sampler overhead per step with a zero model (returns zeros), batch 1: DDPM-1000 and DDIM-50, ours vs
   diffusers' loop; (loop - bare model calls) / steps, wall and process CPU time.
4. FLOP rate: 2048^2 matmuls in fp32 and bf16 measured in the same run; each training / inference row's GFLOP/s as
   a fraction of the matmul rate of its own dtype (a bf16-autocast step against bf16, fp32 against fp32).
5. Compiled vs eager (``--compile``): our training step and inference forward, compiled / eager.
6. The autocast rule on a small model (``autocast``): the 1.1M-parameter quickstart UNet (16x16, 1 channel, 10
   classes), batch 32, a pipeline-style step (``training_losses`` + fused AdamW), default autocast vs fp32: the
   measurement behind "bf16 where native" also holding for small models.

    python benchmarks/perf_suite.py                   # full (the lead's quiet-machine run), ~15-30 min on 2 cores
    python benchmarks/perf_suite.py --quick           # minutes: batch 2, 2 rounds, fewer steps
    python benchmarks/perf_suite.py --compile         # adds the compiled rows (inductor; compile not timed)
    python benchmarks/perf_suite.py --markdown benchmarks/results/perf_suite_cpu.md   # also the README table
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

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")  # many variants: keep oneDNN kernels cached

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from unet_throughput import count_flops  # noqa: E402

from diffusion_core import GaussianDiffusion, get_named_beta_schedule, sample  # noqa: E402
from diffusion_core.models import (  # noqa: E402
    CPU_WARMUP_BATCH_SIZES,
    DDPM_CIFAR10_DIFFUSERS_CONFIG,
    UNet,
    autocast_forward,
    compile_options,
    compile_unet,
    fast_defaults,
    load_diffusers_unet2d,
    optimizer_kwargs,
    train_autocast_dtype,
)
from diffusion_core.samplers import respaced  # noqa: E402

DDPM_CIFAR10 = {**DDPM_CIFAR10_DIFFUSERS_CONFIG, "dropout": 0.1}  # Ho et al. train with dropout 0.1
# A small DDPM-style UNet for the sampling rows (the loop's share of the time is what differs there).
SMALL_SAMPLING = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), "layers_per_block": 1,
    "norm_num_groups": 16, "attention_head_dim": None, "norm_eps": 1e-6, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1,
}
RESULTS = ROOT / "benchmarks" / "results"


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


CLOCK: Callable[[], float] = time.perf_counter  # --clock cpu: time.process_time (all threads' CPU seconds)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds (CLOCK) of each fn per round, the fns taking turns within every round (warm-up rounds untimed)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn()
            out[k].append(CLOCK() - t0)
    return out


# ---------------------------------------------------------------------------------------------- 1. training
def _train_step(model: torch.nn.Module, diff: bool, opt: torch.optim.Optimizer, batch: int,
                amp: torch.dtype | None) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn(batch, 3, 32, 32, generator=g)

    def step() -> None:
        model.train()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            out = model(x, t)
        loss = F.mse_loss((out.sample if diff else out).float(), target)  # the loss in fp32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _infer_step(model: torch.nn.Module, diff: bool, batch: int) -> Callable[[], None]:
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 1000, (batch,), generator=g)

    def step() -> None:
        model.eval()
        with torch.inference_mode():
            model(x, t)

    return step


def training_section(args: argparse.Namespace, reference: Any) -> dict[str, Any]:
    from diffusers import UNet2DModel

    def diffusers_model(channels_last: bool) -> torch.nn.Module:
        m = UNet2DModel(**DDPM_CIFAR10)
        m.load_state_dict(reference.state_dict())
        return m.to(memory_format=torch.channels_last) if channels_last else m

    def ours_model() -> torch.nn.Module:
        return load_diffusers_unet2d(reference.state_dict(), reference.config, dropout=0.1)

    fast_opt, amp = optimizer_kwargs("cpu"), train_autocast_dtype("cpu")  # the defaults: fused AdamW, bf16 if native
    specs: dict[str, tuple[Callable[[], torch.nn.Module], bool, dict, torch.dtype | None, bool]] = {
        # name: (model factory, is_diffusers, optimizer kwargs, autocast dtype, compiled)
        "ours": (ours_model, False, fast_opt, amp, False),
        "ours_fp32": (ours_model, False, fast_opt, None, False),
        "ours_plain_opt": (ours_model, False, {}, amp, False),
        "diffusers": (lambda: diffusers_model(False), True, {}, None, False),
        "diffusers_best": (lambda: diffusers_model(True), True, fast_opt, amp, False),
        "diffusers_best_fp32": (lambda: diffusers_model(True), True, fast_opt, None, False),
    }
    if args.compile:
        specs["ours_compiled"] = (ours_model, False, fast_opt, amp, True)
        specs["diffusers_compiled"] = (lambda: diffusers_model(True), True, fast_opt, amp, True)
    # inference is fp32 (as sampling and serving run): one row per distinct model
    infer_variants = ("ours", "diffusers", "diffusers_best_fp32", "ours_compiled", "diffusers_compiled")
    fwd_flops, train_flops = count_flops(ours_model())
    rows: list[dict[str, Any]] = []
    mm_rates: dict[str, dict[str, float]] = {}
    for batch in args.train_batches:
        steps: dict[str, Callable[[], None]] = {}
        infer: dict[str, Callable[[], None]] = {}
        for name, (make, diff, okw, dtype, comp) in specs.items():
            model = make()
            # diffusers compiled with the same inductor options as ours (its best option)
            run_model = (compile_unet(model) if not diff else torch.compile(model, options=compile_options("cpu"))) \
                if comp else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **okw)
            steps[name] = _train_step(run_model, diff, opt, batch, dtype)
            if batch == max(args.train_batches) and name in infer_variants:
                infer[name] = _infer_step(run_model, diff, batch)
        limit = batch == max(args.train_batches)  # the FLOP-rate rows: their matmul limit in the same rounds
        print(f"[train] batch {batch}: {', '.join(steps)} ({args.rounds} interleaved rounds)", flush=True)
        mm = MatmulLimit()
        timed = interleaved({**steps, **(mm.fns() if limit else {})}, args.rounds, warmup=2 if args.compile else 1)
        if limit:
            mm_rates["train"] = mm.rates(timed)
        for name, secs in timed.items():
            rows.append({"mode": "train", "variant": name, "batch": batch, "images_per_s": batch / _median(secs),
                         "dtype": _dtype_name(specs[name][3]), "seconds_all_rounds": secs})
        if infer:
            print(f"[infer] batch {batch}", flush=True)
            mm = MatmulLimit()
            timed = interleaved({**infer, **mm.fns()}, args.rounds, warmup=2 if args.compile else 1)
            mm_rates["infer"] = mm.rates(timed)
            for name, secs in timed.items():
                rows.append({"mode": "infer", "variant": name, "batch": batch, "dtype": "float32",
                             "images_per_s": batch / _median(secs), "seconds_all_rounds": secs})
    for r in rows:
        r["gflop_per_s"] = r["images_per_s"] * (train_flops if r["mode"] == "train" else fwd_flops) / 1e9
    return {"rows": rows, "fwd_gflop_per_image": fwd_flops / 1e9, "train_gflop_per_image": train_flops / 1e9,
            "matmul_gflop_per_s": mm_rates}


MATMUL_N = 2048


class MatmulLimit:
    """The hardware limit of the FLOP-rate rows: a burst of ``burst`` MATMUL_N^2 matmuls per dtype, run inside
    the interleaved rounds of the steps it bounds, so both see the same phase of this VM (a limit measured only
    before and after the run moved by 1.4x between the two). A round keeps its burst's fastest matmul (caches
    warm, as in a sustained kernel: the first one after a training step starts with the step's data in cache);
    the limit is the median over rounds, in GFLOP/s (2 n^3 FLOPs per matmul)."""

    def __init__(self, burst: int = 4) -> None:
        self.burst, self.best = burst, {"float32": [], "bfloat16": []}

    def fns(self) -> dict[str, Callable[[], None]]:
        """Entries to add to an :func:`interleaved` dict (drop their own timings from its result)."""
        return {f"matmul_{name}": self._bursts(name) for name in self.best}

    def _bursts(self, name: str) -> Callable[[], None]:
        a, b = _matmul_operands(MATMUL_N, getattr(torch, name))

        def run() -> None:
            secs = []
            for _ in range(self.burst):
                t0 = CLOCK()
                a @ b
                secs.append(CLOCK() - t0)
            self.best[name].append(min(secs))
        return run

    def rates(self, timed: dict[str, list[float]]) -> dict[str, float]:
        """GFLOP/s per dtype over the rounds so far (the warm-up rounds included; a median), removing the
        bursts' own entries from ``timed``."""
        for k in [k for k in timed if k.startswith("matmul_")]:
            timed.pop(k)
        return {name: _matmul_gflop_per_s(MATMUL_N, _median(v)) for name, v in self.best.items() if v}


def _matmul_operands(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)


def _matmul_gflop_per_s(n: int, seconds: float) -> float:
    """GFLOP/s of one n x n matmul that took ``seconds`` (2 n^3 FLOPs)."""
    return 2 * n**3 / seconds / 1e9


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype or torch.float32).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------- 2. sampling
def _diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type="epsilon",
                             model_var_type="fixed_small", loss_type="mse")


def _diffusers_loop(unet: Callable, scheduler: Any, noise: torch.Tensor, ddim: bool, seed: int) -> torch.Tensor:
    """diffusers' own sampling loop, as its DDPM/DDIM pipelines run it (no_grad; the pipelines' scaling aside)."""
    g = torch.Generator().manual_seed(seed)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(x, t)
            eps = eps.sample if hasattr(eps, "sample") else eps
            if ddim:  # guided-diffusion's DDIM re-derives eps from the clipped x0
                x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
            else:
                x = scheduler.step(eps, t, x, generator=g).prev_sample
    return x


def _schedulers(d_ours: GaussianDiffusion, sampler: str, steps: int):
    from diffusers import DDIMScheduler, DDPMScheduler

    spaced = respaced(d_ours, sampler, steps)
    timesteps = [int(s) for s in getattr(spaced, "timestep_map", torch.arange(1000)).tolist()][::-1]
    if sampler == "ddim":
        sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
        sch.set_timesteps(steps)
        assert [int(t) for t in sch.timesteps] == timesteps, "DDIM timesteps differ"
    else:
        sch = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
        sch.set_timesteps(timesteps=timesteps)
    return sch


def sampling_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    theirs = UNet2DModel(**SMALL_SAMPLING).eval()
    with torch.no_grad():  # non-trivial outputs: the zero-initialised layers get random weights
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = load_diffusers_unet2d(theirs.state_dict(), theirs.config).eval()
    d = _diffusion()
    rows = []
    for sampler, steps in (("ddim", 20), ("ddpm", args.ddpm_steps)):
        for batch in (1, 16):
            noise = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
            sch = _schedulers(d, sampler, steps)
            res: dict[str, torch.Tensor] = {}

            def run_ours(res=res, noise=noise, sampler=sampler, steps=steps) -> None:
                res["ours"] = sample(d, ours, noise.shape, sampler=sampler, steps=steps, noise=noise,
                                     generator=torch.Generator().manual_seed(7))

            def run_theirs(res=res, noise=noise, sch=sch, sampler=sampler) -> None:
                res["diffusers"] = _diffusers_loop(theirs, sch, noise, sampler == "ddim", seed=7)

            print(f"[sample] {sampler}-{steps} batch {batch}", flush=True)
            timed = interleaved({"ours": run_ours, "diffusers": run_theirs}, args.sample_rounds)
            ips = {k: batch / _median(v) for k, v in timed.items()}
            rows.append({"sampler": sampler, "steps": steps, "batch": batch, "ours_images_per_s": ips["ours"],
                         "diffusers_images_per_s": ips["diffusers"], "ratio": ips["ours"] / ips["diffusers"],
                         "max_abs_image_diff": float((res["ours"] - res["diffusers"]).abs().max()),
                         "seconds_all_rounds": timed})
    return rows


# ---------------------------------------------------------------------------------------------- 3. overhead
def _zero(x: torch.Tensor, t: Any, **_kw: Any) -> torch.Tensor:
    """The trivial model: predicts eps = 0."""
    return torch.zeros_like(x)


def _overhead_row(d: GaussianDiffusion, sampler: str, steps: int, rounds: int) -> dict[str, Any]:
    """(loop - the same number of bare model calls) / steps, ours vs diffusers' loop, wall and CPU time."""
    shape = (1, 3, 32, 32)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sch = _schedulers(d, sampler, steps)
    cpu: dict[str, list[float]] = {"ours": [], "diffusers": [], "bare": []}

    def timed_cpu(key: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            c0 = time.process_time()
            fn()
            cpu[key].append(time.process_time() - c0)
        return run

    def bare() -> None:
        t = torch.zeros(1, dtype=torch.long)
        for _ in range(steps):
            _zero(noise, t)

    fns = {
        "ours": timed_cpu("ours", lambda: sample(d, _zero, shape, sampler=sampler, steps=steps, noise=noise,
                                                 generator=torch.Generator().manual_seed(1))),
        "diffusers": timed_cpu("diffusers", lambda: _diffusers_loop(_zero, sch, noise, sampler == "ddim", 1)),
        "bare": timed_cpu("bare", bare),
    }
    print(f"[overhead] {sampler}-{steps} batch 1", flush=True)
    wall = interleaved(fns, rounds)
    cpu = {k: v[-len(wall[k]):] for k, v in cpu.items()}  # drop the warm-up round
    model_s, model_cpu = _median(wall["bare"]), _median(cpu["bare"])
    row: dict[str, Any] = {"sampler": sampler, "steps": steps, "batch": 1}
    for k in ("ours", "diffusers"):
        row[f"{k}_us_per_step"] = (_median(wall[k]) - model_s) / steps * 1e6
        row[f"{k}_cpu_us_per_step"] = (_median(cpu[k]) - model_cpu) / steps * 1e6
    row["seconds_all_rounds"] = wall
    return row


def overhead_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    d = _diffusion()
    # many short rounds: a loop takes ~0.1 s, and a median over a few of them moved by 1.4x within minutes here
    return [_overhead_row(d, sampler, steps, args.sample_rounds * 5)
            for sampler, steps in (("ddpm", args.overhead_ddpm_steps), ("ddim", 50))]


# ---------------------------------------------------------------------------------------------- 6. autocast
def autocast_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Quickstart UNet training step (batch 32): the default autocast vs fp32, interleaved."""
    d = GaussianDiffusion(betas=get_named_beta_schedule("cosine", 1000), model_mean_type="velocity",
                          model_var_type="fixed_small", loss_type="mse")  # the quickstart's v-prediction
    torch.manual_seed(0)
    base = UNet.quickstart()
    amp = train_autocast_dtype("cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)
    fns = {}
    for name, dtype in (("default", amp), ("fp32", None)):
        model = UNet(**base.config)
        model.load_state_dict(base.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **optimizer_kwargs("cpu"))

        def step(model=model, opt=opt, dtype=dtype) -> None:
            loss = d.training_losses(autocast_forward(model, "cpu", dtype), x, t, model_kwargs={"y": y})["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[name] = step
    print(f"[autocast] quickstart UNet b32: {_dtype_name(amp)} vs float32", flush=True)
    timed = interleaved(fns, args.sample_rounds * 4, warmup=2)
    ips = {k: 32 / _median(v) for k, v in timed.items()}
    return [{"model": "quickstart (1.1M)", "batch": 32, "dtype": _dtype_name(amp), "default_images_per_s":
             ips["default"], "fp32_images_per_s": ips["fp32"], "ratio": ips["default"] / ips["fp32"],
             "seconds_all_rounds": timed}]


# ---------------------------------------------------------------------------------------------- 4. matmul
def matmul_gflops(n: int = MATMUL_N, rounds: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of an n x n matmul in ``dtype`` (2 n^3 FLOPs), median of ``rounds``."""
    a, b = _matmul_operands(n, dtype)
    a @ b
    secs = interleaved({"mm": lambda: a @ b}, rounds)["mm"]
    return _matmul_gflop_per_s(n, _median(secs))


# ---------------------------------------------------------------------------------------------- report
def _pick(rows: list[dict], **kw: Any) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Median over interleaved rounds of a's images/s over b's in the same round, ``(n_a t_b) / (n_b t_a)``, or
    None when the two were not timed in the same rounds. Steadier than the ratio of the two medians when the
    machine's speed drifts during the run (a slow phase then hits both sides of a pair alike)."""
    ta, tb = a.get("seconds_all_rounds"), b.get("seconds_all_rounds")
    if not ta or not tb or len(ta) != len(tb):
        return None
    return _median([(a["batch"] * y) / (b["batch"] * x) for x, y in zip(ta, tb, strict=True)])


def summary(train: dict[str, Any], sampling: list[dict], overhead: list[dict], mm: dict[str, float],
            batches: list[int], autocast: list[dict] | None = None) -> list[dict[str, Any]]:
    """The issue's table: one row per target with our value, the reference value and the ratio.

    ``mm``: the 2048^2 matmul GFLOP/s per dtype name ("float32", "bfloat16"), measured in the same run; a
    FLOP-rate row takes the one timed in its own rounds (``train["matmul_gflop_per_s"][mode]``) when there is one."""
    rows = train["rows"]
    out: list[dict[str, Any]] = []

    def ratio(name: str, a: dict | None, b: dict | None, target: float | None, key: str = "images_per_s") -> None:
        if a and b:
            out.append({"what": name, "ours": a[key], "reference": b[key], "ratio": a[key] / b[key],
                        "paired": paired_ratio(a, b), "target": target})

    for b in batches:
        ours = _pick(rows, mode="train", variant="ours", batch=b)
        amp = ours["dtype"] if ours else "float32"

        def row(variant: str, b: int = b) -> dict | None:
            return _pick(rows, mode="train", variant=variant, batch=b)

        ratio(f"train step b{b}: ours default ({amp}) vs diffusers as shipped (fp32)", ours, row("diffusers"), 1.2)
        ratio(f"train step b{b}: ours default vs diffusers best (cl + fused + {amp})", ours, row("diffusers_best"), 1.05)
        ratio(f"train step b{b}: ours fp32 vs diffusers best fp32 (cl + fused)", row("ours_fp32"),
              row("diffusers_best_fp32"), None)
        ratio(f"train step b{b}: ours default, {amp} vs fp32 autocast gain", ours, row("ours_fp32"), None)
        ratio(f"train step b{b}: ours default with a default AdamW vs diffusers as shipped", row("ours_plain_opt"),
              row("diffusers"), None)
        ratio(f"train step b{b}: ours compiled vs diffusers compiled", row("ours_compiled"), row("diffusers_compiled"),
              1.05)
        ratio(f"train step b{b}: ours compiled vs ours eager", row("ours_compiled"), ours, 1.15)
    bmax = max(batches)
    ratio(f"inference b{bmax}: ours vs diffusers as shipped", _pick(rows, mode="infer", variant="ours", batch=bmax),
          _pick(rows, mode="infer", variant="diffusers", batch=bmax), None)
    ratio(f"inference b{bmax}: ours compiled vs ours eager", _pick(rows, mode="infer", variant="ours_compiled",
          batch=bmax), _pick(rows, mode="infer", variant="ours", batch=bmax), None)
    for a in autocast or []:
        out.append({"what": f"{a['model']} UNet train step b{a['batch']}: default ({a['dtype']}) vs float32",
                    "ours": a["default_images_per_s"], "reference": a["fp32_images_per_s"], "ratio": a["ratio"],
                    "target": None})
    for s in sampling:
        out.append({"what": f"{s['sampler']}-{s['steps']} sampling b{s['batch']} vs diffusers loop "
                    f"(max |img diff| {s['max_abs_image_diff']:.1e})", "ours": s["ours_images_per_s"],
                    "reference": s["diffusers_images_per_s"], "ratio": s["ratio"], "target": 1.2})
    for o in overhead:
        out.append({"what": f"overhead/step {o['sampler']}-{o['steps']} b1, zero model [us] (cpu: ours "
                    f"{o['ours_cpu_us_per_step']:.0f}, diffusers {o['diffusers_cpu_us_per_step']:.0f})",
                    "ours": o["ours_us_per_step"], "reference": o["diffusers_us_per_step"],
                    "ratio": o["diffusers_us_per_step"] / o["ours_us_per_step"], "target": None})
    for mode, target in (("train", 0.7), ("infer", 0.8)):
        limit = {**mm, **train.get("matmul_gflop_per_s", {}).get(mode, {})}
        for variant in ("ours", "ours_fp32", "ours_compiled"):
            r = _pick(rows, mode=mode, variant=variant, batch=bmax)
            if r and r["dtype"] in limit:  # each row against the matmul rate of its own dtype
                out.append({"what": f"{mode} b{bmax} {variant} ({r['dtype']}) GFLOP/s vs 2048^2 {r['dtype']} matmul",
                            "ours": r["gflop_per_s"], "reference": limit[r["dtype"]],
                            "ratio": r["gflop_per_s"] / limit[r["dtype"]], "target": target})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 2, 2 rounds, DDPM-10, overhead DDPM-100")
    p.add_argument("--compile", action="store_true", help="add the compiled rows (slow to compile on CPU)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of the training rows")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--sections", default="train,autocast,sample,overhead",
                   help="subset of train,autocast,sample,overhead")
    p.add_argument("--train-batches", default=None, help="comma-separated training batch sizes (default 8,16)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, steadier than wall time on an oversubscribed machine (use --threads 1)")
    p.add_argument("--out", type=Path, default=RESULTS / "perf_suite_cpu.json")
    p.add_argument("--markdown", type=Path, default=None,
                   help="also write the summary as a Markdown table (the README's perf table is pasted from it)")
    args = p.parse_args(argv)
    args.train_batches = [int(b) for b in args.train_batches.split(",")] if args.train_batches \
        else ([2] if args.quick else [8, 16])
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.sample_rounds = 2 if args.quick else 5
    args.ddpm_steps = 10 if args.quick else 100
    args.overhead_ddpm_steps = 100 if args.quick else 1000
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = {s.strip() for s in args.sections.split(",")}
    from diffusers import UNet2DModel
    from diffusers import __version__ as diffusers_version

    load_before = os.getloadavg()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    mm = {k: matmul_gflops(rounds=args.rounds, dtype=d) for k, d in dtypes.items()}
    torch.manual_seed(0)
    reference = UNet2DModel(**DDPM_CIFAR10)
    train = training_section(args, reference) if "train" in sections else {"rows": []}
    autocast = autocast_section(args) if "autocast" in sections else []
    sampling = sampling_section(args) if "sample" in sections else []
    overhead = overhead_section(args) if "overhead" in sections else []
    mm_after = {k: matmul_gflops(rounds=args.rounds, dtype=d) for k, d in dtypes.items()}
    mm_mean = {k: statistics.mean([mm[k], mm_after[k]]) for k in dtypes}
    table = summary(train, sampling, overhead, mm_mean, args.train_batches, autocast) if train["rows"] \
        else summary({"rows": []}, sampling, overhead, mm_mean, [0], autocast)

    print(f"\nperf suite: torch {torch.__version__}, diffusers {diffusers_version}, threads "
          f"{torch.get_num_threads()}, loadavg before {load_before[0]:.2f} after {os.getloadavg()[0]:.2f}, "
          f"matmul GFLOP/s before/after: " + ", ".join(f"{k} {mm[k]:.0f}/{mm_after[k]:.0f}" for k in dtypes))
    print(f"{'what':<96s} {'ours':>10s} {'ref':>10s} {'ratio':>7s} {'paired':>7s} {'target':>7s}")
    for r in table:
        print(f"{r['what']:<96s} {r['ours']:10.2f} {r['reference']:10.2f} {r['ratio']:7.3f} "
              f"{_fmt(r.get('paired')):>7s} {_fmt(r['target'], 2):>7s}")
    report = {
        "benchmark": "perf_suite (issue 14)",
        "command": " ".join(["perf_suite.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick, "compile": args.compile, "rounds": args.rounds, "clock": args.clock,
        "torch": torch.__version__, "diffusers": diffusers_version, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "fast_defaults": fast_defaults("cpu"), "cpu_warmup_batch_sizes": list(CPU_WARMUP_BATCH_SIZES),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "matmul_2048_gflop_per_s": {k: [mm[k], mm_after[k]] for k in dtypes},
        "train_autocast_dtype": fast_defaults("cpu")["train_autocast_dtype"],
        "note": "medians of interleaved rounds; on a shared machine wall times are noisy (see loadavg)",
        "summary": table, "training": train, "autocast": autocast, "sampling": sampling, "overhead": overhead,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    if args.markdown:
        args.markdown.write_text(markdown_table(report))
        print(f"wrote {args.markdown}")
    return report


def _fmt(x: float | None, digits: int = 3) -> str:
    """A table cell: ``x`` to ``digits`` decimals, or "-" when there is no value."""
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The summary as a Markdown table, with the run's facts (threads, load average) in a header line."""
    lines = [f"perf_suite: torch {report['torch']}, diffusers {report['diffusers']}, {report['threads']} threads, "
             f"training autocast {report['train_autocast_dtype']}, load average "
             f"{report['loadavg_before'][0]:.1f} -> {report['loadavg_after'][0]:.1f}", "",
             "| what | ours | reference | ratio | paired | target |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["summary"]:
        what = r["what"].replace("|", "\\|")  # a literal | (e.g. max |img diff|) would end the cell
        lines.append(f"| {what} | {r['ours']:.2f} | {r['reference']:.2f} | {r['ratio']:.3f} | "
                     f"{_fmt(r.get('paired'))} | {_fmt(r['target'], 2)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
