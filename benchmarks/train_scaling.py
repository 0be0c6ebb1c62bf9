"""Ray Train scaling and overhead at the quickstart preset (digits 16x16, UNet.quickstart, batch 64 per worker).

Measures, in one process and one Ray session:
  * plain loop: the same model, diffusion, loader and optimizer in a single process (1 thread), no Ray, no DDP;
  * Ray Train with 1 CPU worker and with 2 CPU workers (DDP over gloo), 1 thread each;
  * Ray Train start-up: from ``fit()`` to the first finished optimizer step.
Throughput is measured after a warm-up fifth of the steps. Prints a table, writes benchmarks/results/train_scaling.json.

    python benchmarks/train_scaling.py [--steps 150] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def plain_loop(cfg, data, steps: int, repeats: int = 3) -> float:
    """Images/s of a single-process loop with the same pieces (median of ``repeats`` timed windows)."""
    from diffusion_core import UniformSampler
    from pipelines.data import make_loader
    from pipelines.model_io import build_diffusion, build_unet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = build_unet(cfg.model, image_size=data.image_size, channels=data.channels,
                      num_classes=data.num_classes, learn_sigma=False)
    diffusion = build_diffusion(cfg.diffusion)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr)
    ts = UniformSampler(diffusion)
    loader = make_loader(data.train_urls, rank=0, world_size=1, batch_size=cfg.train.batch_size,
                         num_workers=cfg.data.loader_workers, resampled=True, channels=data.channels)
    it = iter(loader)
    rates = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        n = steps // 4
        for _ in range(n):
            x, y = next(it)
            t, w = ts.sample(x.shape[0], torch.device("cpu"))
            loss = (diffusion.training_losses(unet, x, t, model_kwargs={"y": y})["loss"] * w).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
        if r:  # the first window is warm-up
            rates.append(n * x.shape[0] / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_scaling.json"))
    args = ap.parse_args()

    import ray

    from pipelines.config import load_config
    from pipelines.data import prepare_data
    from pipelines.train import run_training

    ws = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base = [f"workspace.root={ws}", f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
            f"train.checkpoint_every={args.steps}", f"train.sample_every={args.steps * 10}",
            "train.log_every=50", "train.threads_per_worker=1", "train.max_failures=0",
            "data.loader_workers=1", "registry.model_name=bench-train"]
    cfg1 = load_config(Path(__file__).parents[1] / "configs" / "quickstart.yaml", base)
    data = prepare_data(cfg1, progress=False)

    plain = plain_loop(cfg1, data, args.steps)
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024 * 1024)
    rows = {"plain_1proc": {"workers": 1, "images_per_sec": plain}}
    for workers in (1, 2):
        cfg = load_config(Path(__file__).parents[1] / "configs" / "quickstart.yaml",
                          [*base, f"train.num_workers={workers}", f"train.run_name=bench-{workers}w-{time.time():.0f}"])
        res = run_training(cfg, data, register=False)
        rows[f"ray_train_{workers}w"] = {"workers": workers, "images_per_sec": res.images_per_sec,
                                         "startup_s": res.first_step_at - res.started_at}
    ray.shutdown()

    r1, r2 = rows["ray_train_1w"], rows["ray_train_2w"]
    summary = {
        "ray_overhead_vs_plain_1w": 1 - r1["images_per_sec"] / plain,  # per-step overhead as a fraction
        "scaling_2w_over_1w": r2["images_per_sec"] / r1["images_per_sec"],
        "targets": {"overhead_le": 0.10, "scaling_ge": 1.6},
    }
    print(f"{'setup':<16}{'workers':>8}{'images/s':>12}{'startup s':>12}")
    for k, v in rows.items():
        print(f"{k:<16}{v['workers']:>8}{v['images_per_sec']:>12.1f}{v.get('startup_s', float('nan')):>12.1f}")
    print(f"Ray Train + DDP per-step overhead vs plain loop (1 worker): {100 * summary['ray_overhead_vs_plain_1w']:.1f}%")
    print(f"2 workers / 1 worker throughput: {summary['scaling_2w_over_1w']:.2f}x")
    out = {"rows": rows, "summary": summary, "steps": args.steps, "batch_size_per_worker": args.batch_size,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "ray": ray.__version__}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
