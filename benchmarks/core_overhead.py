"""How much time does diffusion_core add on top of the model's forward pass?

Runs full sampling loops with a trivial model (it returns zeros: the cost of the "network" is one allocation) and
reports, per configuration, the median wall time of the whole loop over several runs and the core's overhead per
step in microseconds: (loop wall time - the same number of bare model calls) / steps.  On a shared machine wall
time includes waiting for a core, so the same overhead is also reported in process CPU time (with one torch
thread on the CPU this is what the loop would take on an idle core).

    .venv/bin/python benchmarks/core_overhead.py            # table on stdout, JSON in benchmarks/results/
    .venv/bin/python benchmarks/core_overhead.py --repeats 3 --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_core import GaussianDiffusion, get_named_beta_schedule, sample  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "core_overhead.json"


def zero_model(x: torch.Tensor, t: torch.Tensor, **_kwargs) -> torch.Tensor:
    """The trivial model: predicts eps = 0."""
    return torch.zeros_like(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def bench(diffusion, sampler: str, steps: int, shape, device, repeats: int) -> dict:
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    gen = torch.Generator().manual_seed(1)

    def run():
        sample(diffusion, zero_model, shape, sampler=sampler, steps=steps, noise=noise, generator=gen,
               device=device)

    def bare():
        t = torch.zeros(shape[0], dtype=torch.long, device=device)
        for _ in range(steps):
            zero_model(noise, t)

    run()  # warm-up: respacing caches, buffers on the device
    loops = [_time(run, device) for _ in range(repeats)]
    models = [_time(bare, device) for _ in range(repeats)]
    wall, model = statistics.median(w for w, _ in loops), statistics.median(w for w, _ in models)
    cpu, model_cpu = statistics.median(c for _, c in loops), statistics.median(c for _, c in models)
    return {
        "sampler": sampler,
        "loop": {"ddpm": "p_sample_loop", "ddim": "ddim_sample_loop", "dpm_solver": "dpm_solver_sample"}[sampler],
        "steps": steps,
        "shape": list(shape),
        "runs": repeats,
        "wall_s_median": wall,
        "wall_s_runs": [w for w, _ in loops],
        "model_s_median": model,
        "overhead_us_per_step": (wall - model) / steps * 1e6,
        "cpu_s_median": cpu,
        "model_cpu_s_median": model_cpu,
        "overhead_cpu_us_per_step": (cpu - model_cpu) / steps * 1e6,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="runs per configuration (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on shared machines)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    diffusion = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type="epsilon",
                                  model_var_type="fixed_small", loss_type="mse")
    configs = [
        ("ddpm", 1000, (1, 3, 32, 32)),
        ("ddpm", 1000, (16, 3, 32, 32)),
        ("ddim", 50, (1, 3, 32, 32)),
        ("ddim", 50, (16, 3, 32, 32)),
        ("dpm_solver", 20, (16, 3, 32, 32)),
    ]
    rows = [bench(diffusion, s, n, shape, device, args.repeats) for s, n, shape in configs]

    header = (f"{'loop':<18}{'steps':>6}  {'shape':<16}{'wall [s]':>10}{'model [s]':>11}{'core/step [us]':>16}"
              f"{'core cpu/step [us]':>20}")
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['loop']:<18}{r['steps']:>6}  {shape:<16}{r['wall_s_median']:>10.4f}{r['model_s_median']:>11.4f}"
              f"{r['overhead_us_per_step']:>16.1f}{r['overhead_cpu_us_per_step']:>20.1f}")

    report = {
        "benchmark": "diffusion_core per-step overhead with a trivial (zeros) model",
        "method": "median over runs of full-loop wall (and process CPU) time; overhead/step = "
                  "(loop - the same number of bare model calls) / steps",
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
