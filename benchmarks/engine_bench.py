"""The sampling engine alone, WITHOUT Ray or HTTP: images/s and p50 latency at concurrency 1 / 16 / 64.

Imports torch, ``diffusion_core`` and ``pipelines.engine`` only, so it runs on a GPU machine that has no Ray (the
GPU suite calls it). For each UNet preset (``quickstart``: 16x16x1, 10 classes; ``ddpm_cifar10``: Ho et al.'s
35.7M-parameter 32x32x3 network), untrained weights, T = 1000:

- ``c`` closed-loop clients (threads; each submits its next request when the previous one returns) send 1-image
  DDIM requests to one engine, batched (``--max-batch-size``) and unbatched (bound 1);
- the model-only bound: ``min(c, B) / (steps x time of one batch-min(c, B) UNet forward)``, and the engine's
  efficiency against it; the loop's own split (rows per forward, forward ms, per-step overhead ms, waits);
- **mixed**: 12 clients on 1-image DDPM-1000 and 4 on 1-image DDIM-10, per packing policy (fill vs size classes
  ``--pack-ratio`` / ``--pack-rows``): the DDIM-10 p50 against its idle p50, and the rows/s the long ones got.

    python benchmarks/engine_bench.py --quick                         # seconds, CPU
    python benchmarks/engine_bench.py --device cuda --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also when run from elsewhere

from diffusion_core import create_diffusion  # noqa: E402
from diffusion_core.models import UNet  # noqa: E402
from pipelines.engine import Engine, LoopStats, SampleSpec, time_forward  # noqa: E402

T = 1000


@dataclass
class BenchModel:
    """The part of a loaded model the engine needs (pipelines.model_io is not imported: it needs MLflow)."""

    unet: UNet
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.diffusion = create_diffusion(diffusion_steps=T, learn_sigma=bool(self.unet.config.get("learn_sigma")))
        self.unet.eval().to(self.device)

    @property
    def channels(self) -> int:
        return int(self.unet.config["in_channels"])

    @property
    def image_size(self) -> int:
        return int(self.unet.config["image_size"])

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.get("num_classes") or 0)

    def labels_for(self, n: int, class_labels: list[int] | None) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if class_labels is None:
            return torch.arange(n) % self.num_classes
        return torch.tensor(class_labels).expand(n).clone() if len(class_labels) == 1 else torch.tensor(class_labels)


def build(preset: str, device: torch.device) -> BenchModel:
    torch.manual_seed(0)
    unet = UNet.quickstart(image_size=16, in_channels=1, num_classes=10) if preset == "quickstart" \
        else UNet.ddpm_cifar10()
    return BenchModel(unet=unet, device=device, info={"name": preset, "version": "bench"})


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def forward_ms(model: BenchModel, batch: int, repeats: int) -> float:
    """Median milliseconds of one UNet forward of ``batch`` rows (after one warm-up)."""
    x = torch.randn(batch, model.channels, model.image_size, model.image_size, device=model.device)
    t = torch.randint(0, T, (batch,), device=model.device)
    kw = {"y": torch.zeros(batch, dtype=torch.long, device=model.device)} if model.num_classes else {}
    return 1000 * time_forward(model.unet, x, t, kw, repeats)[0]


def closed_loop(engine: Engine, concurrency: int, steps: int, seconds: float, max_requests: int) -> dict:
    """``concurrency`` client threads loop until the time or request budget is used; in-flight requests finish."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    lock = threading.Lock()
    issued = [0]
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if issued[0] >= max_requests:
                    return
                issued[0] += 1
                seed = issued[0]
            start = time.perf_counter()
            result = engine.submit(SampleSpec(num_samples=1, seed=seed, sampler="ddim", steps=steps)).result()
            with lock:
                latencies.append(time.perf_counter() - start)
                batch_sizes.append(result.batch_size)

    before = engine.stats.snapshot()
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(latencies), "elapsed_s": round(elapsed, 2),
            "images_per_s": round(len(latencies) / elapsed, 3),
            "p50_ms": round(1000 * percentile(latencies, 50), 1), "p99_ms": round(1000 * percentile(latencies, 99), 1),
            "mean_batch_size": round(statistics.fmean(batch_sizes), 2) if batch_sizes else None,
            "engine": LoopStats.period(before, engine.stats.snapshot(), elapsed)}


def mixed(engine: Engine, long_steps: int, seconds: float, n_long: int = 12, n_short: int = 4) -> dict:
    """``n_long`` closed-loop clients on 1-image DDPM-``long_steps`` and ``n_short`` on 1-image DDIM-10: the
    DDIM-10 p50 against its idle p50, and the rows/s the long requests got (their throughput)."""
    short = lambda seed: SampleSpec(num_samples=1, seed=seed, sampler="ddim", steps=10)  # noqa: E731
    idle = []
    for i in range(5):
        t = time.perf_counter()
        engine.submit(short(i)).result()
        idle.append(time.perf_counter() - t)
    lat: list[float] = []
    stop = threading.Event()

    def long_client(k: int) -> None:
        while not stop.is_set():
            ticket = engine.submit(SampleSpec(num_samples=1, seed=1000 + k, sampler="ddpm", steps=long_steps))
            while not ticket.future.done() and not stop.is_set():
                time.sleep(0.05)
            ticket.cancel()

    def short_client(k: int) -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            engine.submit(short(100 + k)).result()
            lat.append(time.perf_counter() - t)

    longs = [threading.Thread(target=long_client, args=(k,)) for k in range(n_long)]
    for th in longs:
        th.start()
    time.sleep(0.5)  # the long requests are in
    before, start = engine.stats.snapshot(), time.perf_counter()
    shorts = [threading.Thread(target=short_client, args=(k,)) for k in range(n_short)]
    for th in shorts:
        th.start()
    for th in shorts:
        th.join()
    elapsed, period = time.perf_counter() - start, LoopStats.period(before, engine.stats.snapshot())
    stop.set()
    for th in longs:
        th.join()
    rows = period["mean_rows"] * period["forwards"]
    p_idle, p_load = percentile(idle, 50), percentile(lat, 50)
    return {"long_steps": long_steps, "ddim10_idle_p50_ms": round(1000 * p_idle, 1),
            "ddim10_p50_ms": round(1000 * p_load, 1), "ddim10_requests": len(lat), "ratio": round(p_load / p_idle, 2),
            "long_rows_per_s": round((rows - 10 * len(lat)) / elapsed, 1), "rows_per_s": round(rows / elapsed, 1),
            "engine": period, "target": "ratio <= 3"}


def run_preset(preset: str, args, device: torch.device) -> list[dict]:
    model = build(preset, device)
    rows = []
    for mode, bound in (("batched", args.max_batch_size), ("unbatched", 1)):
        engine = Engine(max_batch_size=bound, max_request_cost=2 * T, max_queue_cost=10**9, compile=args.compile)
        engine.swap(engine.prepare(model, "bench"))
        engine.start()
        closed_loop(engine, min(2, max(args.concurrency)), args.steps, 0.0, 2)  # warm-up
        for c in args.concurrency:
            r = closed_loop(engine, c, args.steps, args.seconds, args.max_requests)
            b = min(c, bound)
            fwd = forward_ms(model, b, args.repeats)
            bound_ips = b / (args.steps * fwd / 1000)  # model-only: one batch-b forward per step, b images
            rows.append({"preset": preset, "mode": mode, "max_batch_size": bound, **r,
                         "forward_ms_at_batch": {str(b): round(fwd, 3)}, "model_only_images_per_s": round(bound_ips, 3),
                         "efficiency": round(r["images_per_s"] / bound_ips, 3)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        engine.stop()
    return rows


def run_mixed(preset: str, args, device: torch.device) -> list[dict]:
    """The mixed scenario per packing policy: fill (pack_ratio None) vs size classes (--pack-ratio/--pack-rows)."""
    model, out = build(preset, device), []
    policies = [("fill", None, None), ("classes", args.pack_ratio, args.pack_rows)]
    for name, ratio, rows in policies:
        engine = Engine(max_batch_size=args.max_batch_size, max_request_cost=2 * T, max_queue_cost=10**9,
                        compile=args.compile, pack_ratio=ratio, pack_rows=rows)
        engine.swap(engine.prepare(model, "bench"))
        engine.start()
        r = {"preset": preset, "policy": name, "pack_ratio": ratio, "pack_rows": engine.health()["pack_rows"],
             **mixed(engine, args.long_steps, args.seconds)}
        engine.stop()
        print(json.dumps(r), file=sys.stderr, flush=True)
        out.append(r)
    return out


def table(rows: list[dict]) -> str:
    head = (f"{'preset':<13}{'mode':<10}{'c':>4}{'img/s':>10}{'p50 ms':>10}{'bound':>10}{'eff':>7}{'batch':>7}"
            f"{'rows/fw':>9}{'fw ms':>8}{'ovh ms':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        e = r.get("engine", {})
        lines.append(f"{r['preset']:<13}{r['mode']:<10}{r['concurrency']:>4}{r['images_per_s']:>10.2f}"
                     f"{r['p50_ms']:>10.1f}{r['model_only_images_per_s']:>10.2f}{r['efficiency']:>7.2f}"
                     f"{(r['mean_batch_size'] or 0):>7.1f}{e.get('mean_rows', 0):>9.2f}{e.get('forward_ms', 0):>8.1f}"
                     f"{e.get('overhead_ms', 0):>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", nargs="+", choices=["quickstart", "ddpm_cifar10"],
                    default=["quickstart", "ddpm_cifar10"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps per request")
    ap.add_argument("--max-batch-size", type=int, default=64, help="engine bound with batching on")
    ap.add_argument("--seconds", type=float, default=20.0, help="time budget per (preset, mode, concurrency)")
    ap.add_argument("--max-requests", type=int, default=2000, help="request budget per (preset, mode, concurrency)")
    ap.add_argument("--repeats", type=int, default=10, help="timed forwards for the model-only bound")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (engine pads to buckets)")
    ap.add_argument("--scenarios", nargs="*", choices=["levels", "mixed"], default=["levels", "mixed"],
                    help="levels: closed-loop concurrency levels; mixed: 12 DDPM-long + 4 DDIM-10 clients per policy")
    ap.add_argument("--long-steps", type=int, default=1000, help="DDPM steps of the mixed scenario's long requests")
    ap.add_argument("--pack-ratio", type=float, default=4.0, help="the mixed scenario's size-class policy")
    ap.add_argument("--pack-rows", type=int, default=None,
                    help="the mixed scenario's size-class policy (default: calibrated by the engine)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: concurrency 1 4, 4 steps, 2 s per level, quickstart only unless --preset")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="directory for the JSON")
    args = ap.parse_args(argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.concurrency = args.concurrency if "--concurrency" in given else [1, 4]
        args.steps = args.steps if "--steps" in given else 4
        args.seconds = args.seconds if "--seconds" in given else 2.0
        args.repeats = args.repeats if "--repeats" in given else 3
        args.max_batch_size = args.max_batch_size if "--max-batch-size" in given else 16
        args.preset = args.preset if "--preset" in given else ["quickstart"]
        args.long_steps = args.long_steps if "--long-steps" in given else 50
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_at_start = os.getloadavg()
    rows = [r for preset in args.preset for r in run_preset(preset, args, device)] if "levels" in args.scenarios else []
    mixed_rows = [r for preset in args.preset for r in run_mixed(preset, args, device)] \
        if "mixed" in args.scenarios else []
    print(table(rows))
    for r in mixed_rows:
        print(f"mixed {r['preset']:<12}{r['policy']:<8} DDIM-10 p50 {r['ddim10_p50_ms']:.0f} ms = {r['ratio']:.2f} x idle "
              f"{r['ddim10_idle_p50_ms']:.0f} ms; long rows/s {r['long_rows_per_s']:.0f}, all rows/s {r['rows_per_s']:.0f}")
    report = {
        "benchmark": "engine_bench", "command": " ".join(["benchmarks/engine_bench.py", *(argv or sys.argv[1:])]),
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "torch": torch.__version__, "quick": args.quick, "compile": args.compile, "steps": args.steps,
        "seconds_per_level": args.seconds, "request": {"num_samples": 1, "sampler": "ddim", "steps": args.steps},
        "results": rows, "mixed": mixed_rows, "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine_bench_{args.device}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"out": str(path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
