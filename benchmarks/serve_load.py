"""Closed-loop load test of the sampling endpoint on loopback: dynamic batching on vs off.

Registers an untrained quickstart UNet (the quickstart config's shape: 16x16x1, 10 classes, T=1000) in a
temporary MLflow registry, deploys the Serve app twice (``serve.max_batch_size`` = 16, then 1 = batching off) and
runs ``c`` closed-loop clients (each sends its next request when the previous one returns) at every
concurrency, bounded by ``--seconds`` and ``--max-requests``. Requests: 1 image, DDIM, 20 steps.
Reports images/s, p50/p99 latency and errors (non-200 answers, by status) as JSON.

    .venv/bin/python benchmarks/serve_load.py                      # full run (~5 min on 2 cores)
    .venv/bin/python benchmarks/serve_load.py --seconds 8 --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, also when run from elsewhere
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


async def closed_loop(url: str, concurrency: int, seconds: float, max_requests: int, body: dict) -> dict:
    """``concurrency`` clients loop until the time or request budget is used; in-flight requests finish."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient, k: int) -> None:
        nonlocal issued
        while time.perf_counter() < deadline and issued < max_requests:
            issued += 1
            t = time.perf_counter()
            try:
                r = await c.post(f"{url}/v1/generate", json={**body, "seed": issued})
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            if status == "200":
                latencies.append(time.perf_counter() - t)
                batch_sizes.append(r.json()["batch_size"])
            else:
                errors[status] = errors.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        await asyncio.gather(*(client(c, k) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    ok = len(latencies)
    return {
        "concurrency": concurrency, "requests": ok + sum(errors.values()), "ok": ok,
        "errors": sum(errors.values()), "errors_by_status": errors, "elapsed_s": round(elapsed, 2),
        "images_per_s": round(ok * body["num_samples"] / elapsed, 3),
        "p50_ms": round(1000 * percentile(latencies, 50), 1), "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "mean_batch_size": round(statistics.fmean(batch_sizes), 2) if batch_sizes else None,
    }


def register_quickstart(workspace: Path) -> tuple[list[str], dict]:
    """Register an untrained quickstart UNet; returns the config overrides and its size facts."""
    import mlflow
    import torch

    from pipelines.config import load_config
    from pipelines.model_io import build_unet, diffusion_card, log_and_register
    from pipelines.tracking import setup_mlflow

    base = [f"workspace.root={workspace}", "registry.model_name=serve-bench"]
    cfg = load_config(None, base)
    torch.manual_seed(0)
    unet = build_unet(cfg.model, image_size=cfg.data.image_size, channels=cfg.data.channels, num_classes=10,
                      learn_sigma=cfg.diffusion.learn_sigma)
    exp = setup_mlflow(cfg)
    with mlflow.start_run(experiment_id=exp, run_name="serve-bench") as run:
        pass
    card = {"unet": unet.config, "diffusion": diffusion_card(cfg.diffusion),
            "data": {"image_size": cfg.data.image_size, "channels": cfg.data.channels, "num_classes": 10},
            "training": {"steps": 0, "run_id": run.info.run_id}}
    log_and_register(unet.state_dict(), card, run_id=run.info.run_id, model_name="serve-bench", alias="champion")
    facts = {"preset": cfg.model.preset, "params": sum(p.numel() for p in unet.parameters()),
             "image_size": cfg.data.image_size, "channels": cfg.data.channels, "num_classes": 10,
             "diffusion_steps": cfg.diffusion.diffusion_steps}
    return base, facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--seconds", type=float, default=20.0, help="time budget per (mode, concurrency)")
    ap.add_argument("--max-requests", type=int, default=400, help="request budget per (mode, concurrency)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16, help="serve.max_batch_size with batching on")
    ap.add_argument("--batch-wait", type=float, default=0.25,
                    help="serve.batch_wait_timeout_s: closed-loop clients need about one HTTP round trip to resubmit")
    ap.add_argument("--threads", type=int, default=None, help="serve.threads_per_replica (default: 1 per CPU)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load_cpu.json"))
    args = ap.parse_args(argv)

    import ray
    import torch

    from pipelines.config import load_config
    from pipelines.serve import deploy, shutdown

    load_at_start = os.getloadavg()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024)
    top = max(args.concurrency)
    body = {"num_samples": 1, "sampler": "ddim", "steps": args.steps}
    results = []
    with tempfile.TemporaryDirectory() as ws:
        base, facts = register_quickstart(Path(ws))
        for mode, batch in (("batched", args.batch_size), ("unbatched", 1)):
            overrides = [*base, f"serve.port={args.port}", f"serve.max_batch_size={batch}",
                         f"serve.batch_wait_timeout_s={args.batch_wait}",
                         f"serve.max_samples_per_request={batch}", f"serve.max_ongoing_requests={top}",
                         f"serve.max_queued_requests={top}", f"serve.use_gpu={str(args.use_gpu).lower()}"]
            if args.threads:
                overrides.append(f"serve.threads_per_replica={args.threads}")
            cfg = load_config(None, overrides)
            t = time.perf_counter()
            deployed = deploy(cfg)
            print(f"[{mode}] deployed in {time.perf_counter() - t:.1f}s on {deployed.model.device}", file=sys.stderr)
            asyncio.run(closed_loop(deployed.url, 2, 3.0, 6, body))  # warm-up
            for c in args.concurrency:
                r = asyncio.run(closed_loop(deployed.url, c, args.seconds, args.max_requests, body))
                r = {"mode": mode, "max_batch_size": batch, **r}
                print(json.dumps(r), file=sys.stderr)
                results.append(r)
            shutdown()
    ray.shutdown()

    def ips(mode: str, c: int) -> float | None:
        return next((r["images_per_s"] for r in results if r["mode"] == mode and r["concurrency"] == c), None)

    speedups = {str(c): round(ips("batched", c) / ips("unbatched", c), 2)
                for c in args.concurrency if ips("unbatched", c)}
    report = {
        "benchmark": "serve_load", "command": " ".join(["benchmarks/serve_load.py", *(argv or sys.argv[1:])]),
        "device": "cuda" if args.use_gpu else "cpu", "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "ray": ray.__version__, "model": facts,
        "request": body, "seconds_per_level": args.seconds, "max_requests_per_level": args.max_requests,
        "results": results, "speedup_batched_over_unbatched": speedups,
        "target": "batched >= 3x unbatched images/s at concurrency 16 with zero errors (2 CPU cores)",
        "batch_wait_timeout_s": args.batch_wait, "threads_per_replica": args.threads or 1,
        "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"speedup": speedups, "out": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
