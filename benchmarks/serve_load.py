"""Load test of the sampling endpoint (step-level continuous batching) on loopback, through real Ray Serve.

Registers an untrained quickstart UNet (the quickstart config's shape: 16x16x1, 10 classes, T=1000) in a
temporary MLflow registry and deploys the Serve app twice, side by side: ``serve.max_batch_size`` = 16 at ``/``
and 1 (unbatched) at ``/unbatched``, each one replica:

1. **levels**: ``c`` closed-loop clients (each sends its next request when the previous one returns) at every
   concurrency, bounded by ``--seconds`` and ``--max-requests``; 1-image DDIM-20 requests. The two deployments
   take turns in ``--rounds`` windows (A B B A ...), so the machine's drift falls on both alike. Images/s,
   p50/p99 over the pooled windows, errors by status, and the model-only bound measured in the same run,
   16 / (steps x one batch-16 forward).
Then, on the batched deployment only:
2. **mixed**: 12 clients on DDPM-1000 and 4 on DDIM-10; the DDIM-10 p50 against its idle p50 (on a CPU the
   batched deployment uses size-class packing, ``serve.pack_ratio`` 4, ``serve.pack_rows`` calibrated at load:
   see ``pipelines/engine.py``; ``--fill`` turns it off);
3. **aborted**: 3 clients give up on 16-image DDPM-1000 requests after 0.5 s; then one 2-step request's latency;
4. **streams**: 6 streams of 16 images, DDPM-300, guidance 3; a 2-step request's latency while they run;
5. **rollout**: 8 clients keep sending while @champion moves to a new version; failed requests and the time
   until a response names the new version (``serve.reload_interval_s`` = ``--reload-interval``).
``--quick`` shrinks every budget (long requests 50 steps instead of 1000/300) to check the script in seconds.

    .venv/bin/python benchmarks/serve_load.py                      # full run (quiet machine)
    .venv/bin/python benchmarks/serve_load.py --quick
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


from pipelines.engine import LoopStats  # noqa: E402

DEFAULT_OUT = str(Path(__file__).parent / "results" / "serve_load_cpu.json")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


_GROUPS = (("ServeReplica", "replica"), ("ProxyActor", "proxy"), ("ServeController", "controller"),
           ("raylet", "raylet"), ("gcs_server", "gcs"))


def cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of this process (the load clients) and of its descendants (the Ray cluster it started),
    grouped: replica, proxy, controller, raylet, gcs, other."""
    import psutil

    me = psutil.Process()
    out = {"client": sum(me.cpu_times()[:2])}
    for p in me.children(recursive=True):
        try:
            cmd, t = " ".join(p.cmdline()), sum(p.cpu_times()[:2])
        except psutil.Error:
            continue
        group = next((g for key, g in _GROUPS if key in cmd), "other")
        out[group] = out.get(group, 0.0) + t
    return out


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds per request, by process group, between two :func:`cpu_by_process` snapshots."""
    d = {k: round(1000 * (after.get(k, 0.0) - before.get(k, 0.0)) / max(1, requests), 2) for k in after}
    d["total"] = round(sum(d.values()), 2)
    return d


async def closed_loop(url: str, concurrency: int, seconds: float, max_requests: int, body: dict) -> dict:
    """One window: ``concurrency`` clients loop until the time or request budget is used (in-flight requests
    finish). Returns the raw window (latencies, errors, engine and CPU snapshots); :func:`summary` reads it."""
    w: dict = {"latencies": [], "batch_sizes": [], "errors": {}}
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
                w["latencies"].append(time.perf_counter() - t)
                w["batch_sizes"].append(r.json()["batch_size"])
            else:
                w["errors"][status] = w["errors"].get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        w["stats_before"], w["cpu_before"] = (await c.get(f"{url}/healthz")).json()["stats"], cpu_by_process()
        start = time.perf_counter()
        await asyncio.gather(*(client(c, k) for k in range(concurrency)))
        w["elapsed"] = time.perf_counter() - start
        w["stats_after"], w["cpu_after"] = (await c.get(f"{url}/healthz")).json()["stats"], cpu_by_process()
    return w


def _summed(windows: list[dict], before: str, after: str) -> dict[str, float]:
    """The per-window differences ``after - before`` of a snapshot, summed over the windows."""
    keys = {k for w in windows for k in w[after]}
    return {k: sum(w[after].get(k, 0.0) - w[before].get(k, 0.0) for w in windows) for k in keys}


def summary(windows: list[dict], concurrency: int, body: dict) -> dict:
    """One level's figures over its windows: latencies pooled, time and counts summed."""
    lat = [x for w in windows for x in w["latencies"]]
    sizes = [b for w in windows for b in w["batch_sizes"]]
    errors: dict[str, int] = {}
    for w in windows:
        for k, v in w["errors"].items():
            errors[k] = errors.get(k, 0) + v
    elapsed, ok, failed = sum(w["elapsed"] for w in windows), len(lat), sum(errors.values())
    engine = _summed(windows, "stats_before", "stats_after")
    return {
        "concurrency": concurrency, "windows": len(windows), "requests": ok + failed, "ok": ok, "errors": failed,
        "errors_by_status": errors, "elapsed_s": round(elapsed, 2),
        "images_per_s": round(ok * body["num_samples"] / elapsed, 3),
        "p50_ms": round(1000 * percentile(lat, 50), 1), "p99_ms": round(1000 * percentile(lat, 99), 1),
        "mean_batch_size": round(statistics.fmean(sizes), 2) if sizes else None,
        "engine": LoopStats.period(dict.fromkeys(engine, 0.0), engine, elapsed),  # rows/forward, ms, busy
        "cpu_ms_per_request": cpu_ms_per_request({}, _summed(windows, "cpu_before", "cpu_after"), ok + failed),
    }


async def interleaved_level(urls: dict[str, str], concurrency: int, seconds: float, max_requests: int,
                            body: dict, rounds: int, between=None) -> dict[str, dict]:
    """Each deployment's level in ``rounds`` windows of ``seconds / rounds``, in A B B A A B ... order, so drift
    in the machine's speed falls on both sides alike; ``between()`` runs after each round (the server idle)."""
    windows: dict[str, list[dict]] = {mode: [] for mode in urls}
    for r in range(rounds):
        for mode in (list(urls) if r % 2 == 0 else list(urls)[::-1]):
            windows[mode].append(await closed_loop(urls[mode], concurrency, seconds / rounds,
                                                   max(1, max_requests // rounds), body))
        if between is not None:
            between()
    return {mode: summary(ws, concurrency, body) for mode, ws in windows.items()}


def register_quickstart(workspace: Path, seed: int = 0, alias: str | None = "champion"):
    """Register an untrained quickstart UNet; returns the config overrides, its size facts and the UNet."""
    import mlflow
    import torch

    from pipelines.config import load_config
    from pipelines.model_io import build_unet, diffusion_card, log_and_register
    from pipelines.tracking import setup_mlflow

    base = [f"workspace.root={workspace}", "registry.model_name=serve-bench"]
    cfg = load_config(None, base)
    torch.manual_seed(seed)
    unet = build_unet(cfg.model, image_size=cfg.data.image_size, channels=cfg.data.channels, num_classes=10,
                      learn_sigma=cfg.diffusion.learn_sigma)
    exp = setup_mlflow(cfg)
    with mlflow.start_run(experiment_id=exp, run_name=f"serve-bench-{seed}") as run:
        pass
    card = {"unet": unet.config, "diffusion": diffusion_card(cfg.diffusion),
            "data": {"image_size": cfg.data.image_size, "channels": cfg.data.channels, "num_classes": 10},
            "training": {"steps": 0, "run_id": run.info.run_id}}
    log_and_register(unet.state_dict(), card, run_id=run.info.run_id, model_name="serve-bench", alias=alias)
    facts = {"preset": cfg.model.preset, "params": sum(p.numel() for p in unet.parameters()),
             "image_size": cfg.data.image_size, "channels": cfg.data.channels, "num_classes": 10,
             "diffusion_steps": cfg.diffusion.diffusion_steps}
    return base, facts, unet


class ModelOnlyBound:
    """Images/s of back-to-back batch-``batch`` UNet forwards, ``steps`` per image, in this process: measured at
    the start and again after every round of windows (this VM's speed drifts by up to 2x within minutes, so one
    early measurement is no bound for a window minutes later); the bound is the median of all."""

    def __init__(self, unet, batch: int, steps: int, threads: int, repeats: int = 10) -> None:
        import torch

        torch.set_num_threads(threads)
        self.unet, self.batch, self.steps, self.repeats = unet.eval(), batch, steps, repeats
        self.x = torch.randn(batch, 1, 16, 16)
        self.t, self.y = torch.randint(0, 1000, (batch,)), torch.zeros(batch, dtype=torch.long)
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.measure()

    def measure(self) -> None:
        from pipelines.engine import time_forward

        wall, cpu = time_forward(self.unet, self.x, self.t, {"y": self.y}, self.repeats)
        self.walls.append(wall)
        self.cpus.append(cpu)

    def report(self) -> dict:
        fwd = statistics.median(self.walls)
        # wall time is the bound; the CPU time tells how much of it other load on the machine took
        return {"batch": self.batch, "forward_ms": round(fwd * 1000, 2),
                "forward_cpu_ms": round(statistics.median(self.cpus) * 1000, 2),
                "forward_ms_all": [round(w * 1000, 2) for w in self.walls],
                "images_per_s": round(self.batch / (self.steps * fwd), 3)}


async def one(c: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float, dict | None]:
    t = time.perf_counter()
    r = await c.post(f"{url}/v1/generate", json=body)
    return r.status_code, time.perf_counter() - t, (r.json() if r.status_code == 200 else None)


async def drained(c: httpx.AsyncClient, url: str, timeout_s: float = 600.0) -> None:
    """Wait until the replica's queue is empty (cancelled work gone)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if (await c.get(f"{url}/healthz")).json().get("queued_cost") == 0:
            return
        await asyncio.sleep(0.2)


async def until_cancelled(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def mixed(url: str, long_steps: int, seconds: float) -> dict:
    """12 clients on DDPM-long, 4 on DDIM-10: DDIM-10 p50 vs idle p50."""
    short = {"num_samples": 1, "sampler": "ddim", "steps": 10}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=32)) as c:
        idle = [(await one(c, url, {**short, "seed": i}))[1] for i in range(5)]
        lat: list[float] = []
        deadline = time.perf_counter() + seconds

        async def loop(body: dict, record: bool) -> None:
            while time.perf_counter() < deadline:
                code, dt, _ = await one(c, url, body)
                if record and code == 200:
                    lat.append(dt)

        longs = [asyncio.create_task(loop({"num_samples": 1, "sampler": "ddpm", "steps": long_steps}, False))
                 for _ in range(12)]
        await asyncio.sleep(min(2.0, seconds / 4))  # the long requests are in
        before, start = (await c.get(f"{url}/healthz")).json()["stats"], time.perf_counter()
        await asyncio.gather(*(loop(short, True) for _ in range(4)))
        health, elapsed = (await c.get(f"{url}/healthz")).json(), time.perf_counter() - start
        after = health["stats"]
        await until_cancelled(longs)  # disconnects: the server drops them
        await drained(c, url)
    p_idle, p_load = percentile(idle, 50), percentile(lat, 50)
    return {"long_steps": long_steps, "pack_ratio": health.get("pack_ratio"), "pack_rows": health.get("pack_rows"),
            "ddim10_idle_p50_ms": round(1000 * p_idle, 1),
            "ddim10_p50_ms": round(1000 * p_load, 1), "ddim10_requests": len(lat),
            "ratio": round(p_load / p_idle, 2), "rows_per_s": round((after["rows"] - before["rows"]) / elapsed, 1),
            "long_rows_per_s": round((after["rows"] - before["rows"] - 10 * len(lat)) / elapsed, 1),
            "engine": LoopStats.period(before, after, elapsed), "target": "ratio <= 3"}


async def aborted(url: str, long_steps: int) -> dict:
    """3 clients give up on 16-image DDPM-long requests after 0.5 s; then a 2-step request."""
    body = {"num_samples": 16, "sampler": "ddpm", "steps": long_steps}
    async with httpx.AsyncClient(timeout=0.5) as c:
        async def give_up(i: int) -> str:
            try:
                await c.post(f"{url}/v1/generate", json={**body, "seed": i})
                return "answered"
            except httpx.TimeoutException:
                return "gave_up"

        outcomes = await asyncio.gather(*(give_up(i) for i in range(3)))
    async with httpx.AsyncClient(timeout=600) as c:
        code, dt, _ = await one(c, url, {"num_samples": 1, "steps": 2})
        await drained(c, url)
    return {"long_steps": long_steps, "aborted": outcomes, "next_status": code, "next_latency_ms": round(1000 * dt, 1),
            "target": "next_latency <= 2000 ms"}


async def streams(url: str, long_steps: int) -> dict:
    """6 long streams (16 images, DDPM, guidance 3) run; a 2-step request meanwhile."""
    body = {"num_samples": 16, "sampler": "ddpm", "steps": long_steps, "guidance_scale": 3.0, "class_labels": [1]}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=16)) as c:
        started = asyncio.Event()
        count = 0

        async def stream(i: int) -> None:
            nonlocal count
            async with c.stream("POST", f"{url}/v1/generate/stream", json={**body, "seed": i}) as r:
                async for _line in r.aiter_lines():
                    count += 1 if _line.startswith("event: start") else 0
                    if count >= 6:
                        started.set()

        tasks = [asyncio.create_task(stream(i)) for i in range(6)]
        await asyncio.wait_for(started.wait(), 120)
        code, dt, _ = await one(c, url, {"num_samples": 1, "steps": 2})
        await until_cancelled(tasks)
        await drained(c, url)
    return {"long_steps": long_steps, "next_status": code, "next_latency_ms": round(1000 * dt, 1),
            "target": "next_latency <= 3000 ms"}


async def rollout(url: str, move, min_requests: int, reload_interval: float) -> dict:
    """8 clients keep sending 1-image DDIM-5 requests while ``move()`` moves the alias."""
    codes: dict[str, int] = {}
    after, seen_new, moved_at, new_at = 0, False, None, None
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=8)) as c:
        old = (await c.get(f"{url}/v1/model")).json()["version"]

        async def client(k: int) -> None:
            nonlocal after, seen_new, new_at
            while not (seen_new and after >= min_requests):
                try:
                    code, _, body = await one(c, url, {"num_samples": 1, "steps": 5, "seed": k})
                    status = str(code)
                except httpx.HTTPError as e:
                    status, body = type(e).__name__, None
                codes[status] = codes.get(status, 0) + 1
                if moved_at is not None:
                    after += 1
                    if body and body["model"]["version"] != old and not seen_new:
                        seen_new, new_at = True, time.perf_counter()

        tasks = [asyncio.create_task(client(k)) for k in range(8)]
        await asyncio.sleep(2.0)
        new = await asyncio.to_thread(move)
        moved_at = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*tasks), reload_interval + 600)
    failed = sum(v for k, v in codes.items() if k != "200")
    return {"old_version": old, "new_version": new, "requests_after_move": after, "by_status": codes,
            "failed": failed, "new_version_reported_after_s": round(new_at - moved_at, 2),
            "reload_interval_s": reload_interval, "target": "failed == 0 and reported within reload_interval + 10 s"}


def deploy_mode(mode: str, batch: int, base: list[str], args, top: int) -> str:
    """Deploy one mode's Serve app (same server code, ``serve.max_batch_size`` = ``batch``) beside the others:
    "batched" at /, the rest at /<mode>. Returns its base URL."""
    from ray import serve

    from pipelines.config import load_config
    from pipelines.serve import build_app, deploy

    overrides = [*base, f"serve.port={args.port}", f"serve.max_batch_size={batch}",
                 f"serve.reload_interval_s={args.reload_interval}",
                 f"serve.pack_ratio={args.pack_ratio if args.pack_ratio and batch > 1 else 'null'}",
                 *([f"serve.pack_rows={args.pack_rows}"] if args.pack_rows and batch > 1 else []),
                 f"serve.max_ongoing_requests={max(top, 64)}",
                 f"serve.max_queued_requests={max(top, 64)}", f"serve.use_gpu={str(args.use_gpu).lower()}",
                 *([f"serve.threads_per_replica={args.threads}"] if args.threads else [])]
    cfg = load_config(None, overrides)
    t = time.perf_counter()
    if mode == "batched":
        url = deploy(cfg).url
    else:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})  # no-op when already up
        serve.run(build_app(cfg), name=mode, route_prefix=f"/{mode}", blocking=False)
        url = f"http://{cfg.serve.host}:{cfg.serve.port}/{mode}"
    print(f"[{mode}] deployed in {time.perf_counter() - t:.1f}s at {url}", file=sys.stderr)
    return url


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--seconds", type=float, default=20.0, help="time budget per (mode, concurrency)")
    ap.add_argument("--max-requests", type=int, default=400, help="request budget per (mode, concurrency)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="windows per (mode, concurrency), the modes interleaved A B B A ... (budgets split)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16, help="serve.max_batch_size with batching on")
    ap.add_argument("--reload-interval", type=float, default=5.0, help="serve.reload_interval_s (rollout)")
    ap.add_argument("--scenarios", nargs="*", default=["mixed", "aborted", "streams", "rollout"],
                    help="scenarios after the load levels (on the batched deployment)")
    ap.add_argument("--modes", nargs="+", choices=["batched", "unbatched"], default=["batched", "unbatched"],
                    help="deployments to run (the ratios need both)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small budgets, long requests of 50 steps")
    ap.add_argument("--pack-ratio", type=float, default=None,
                    help="serve.pack_ratio of the batched deployment (default: 4 on a CPU, none with --use-gpu)")
    ap.add_argument("--pack-rows", type=int, default=None,
                    help="serve.pack_rows of the batched deployment (default: calibrated by the engine at load)")
    ap.add_argument("--fill", action="store_true", help="no size classes: fill every forward (pack_ratio None)")
    ap.add_argument("--threads", type=int, default=None, help="serve.threads_per_replica (default: 1 per CPU)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if not args.fill and not args.use_gpu:  # CPU: a forward's time grows with its rows (engine.py, Packing)
        args.pack_ratio = 4.0 if args.pack_ratio is None else args.pack_ratio
    if args.fill:
        args.pack_ratio = args.pack_rows = None
    if args.quick:
        args.concurrency, args.seconds, args.max_requests, args.rounds = [1, 4], 3.0, 40, 1
    long_steps = 50 if args.quick else 1000
    stream_steps = 50 if args.quick else 300
    if args.quick and args.out == DEFAULT_OUT:
        args.out = DEFAULT_OUT.replace(".json", "_quick.json")

    import ray
    import torch

    from pipelines.serve import shutdown

    load_at_start = os.getloadavg()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024)
    top = max(args.concurrency)
    body = {"num_samples": 1, "sampler": "ddim", "steps": args.steps}
    results = []
    with tempfile.TemporaryDirectory() as ws:
        base, facts, unet = register_quickstart(Path(ws))
        bounds = ModelOnlyBound(unet, args.batch_size, args.steps, args.threads or 1)
        batches = {m: b for m, b in (("batched", args.batch_size), ("unbatched", 1)) if m in args.modes}
        urls = {mode: deploy_mode(mode, batch, base, args, top) for mode, batch in batches.items()}
        for url in urls.values():
            asyncio.run(closed_loop(url, 2, 3.0, 6, body))  # warm-up
        for c in args.concurrency:
            level = asyncio.run(interleaved_level(urls, c, args.seconds, args.max_requests, body, args.rounds,
                                                  between=bounds.measure))
            for mode, r in level.items():
                r = {"mode": mode, "max_batch_size": batches[mode], **r}
                print(json.dumps(r), file=sys.stderr)
                results.append(r)
        scenarios = run_scenarios(urls["batched"], args, Path(ws), long_steps, stream_steps) \
            if "batched" in urls else {}
        shutdown()
    ray.shutdown()
    bound = bounds.report()

    def ips(mode: str, c: int) -> float | None:
        return next((r["images_per_s"] for r in results if r["mode"] == mode and r["concurrency"] == c), None)

    def p50(mode: str, c: int) -> float | None:
        return next((r["p50_ms"] for r in results if r["mode"] == mode and r["concurrency"] == c), None)

    speedups = {str(c): round(ips("batched", c) / ips("unbatched", c), 2)
                for c in args.concurrency if ips("unbatched", c) and ips("batched", c)}
    c_hi = 16 if 16 in args.concurrency else max(args.concurrency)
    checks = {
        "c1_p50_batched_over_unbatched": round(p50("batched", 1) / p50("unbatched", 1), 3)
        if p50("batched", 1) and p50("unbatched", 1) else None,
        f"c{c_hi}_throughput_batched_over_unbatched": speedups.get(str(c_hi)),
        f"c{c_hi}_throughput_over_model_only_bound": round(ips("batched", c_hi) / bound["images_per_s"], 3)
        if ips("batched", c_hi) else None,
        "targets": "c1 p50 ratio <= 1.15; c16 >= 3x unbatched and >= 0.75 of the model-only bound",
    }
    report = {
        "benchmark": "serve_load", "command": " ".join(["benchmarks/serve_load.py", *(argv or sys.argv[1:])]),
        "device": "cuda" if args.use_gpu else "cpu", "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "ray": ray.__version__, "model": facts,
        "request": body, "seconds_per_level": args.seconds, "max_requests_per_level": args.max_requests,
        "quick": args.quick, "results": results, "speedup_batched_over_unbatched": speedups,
        "model_only_bound": bound, "checks": checks, "scenarios": scenarios,
        "threads_per_replica": args.threads or 1, "pack_ratio": args.pack_ratio, "pack_rows": args.pack_rows,
        "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results, bound))
    for name, sc in scenarios.items():
        print(f"{name:<9}", json.dumps(sc))
    print(json.dumps({"checks": checks, "out": str(out)}))
    return 0


def run_scenarios(url: str, args, ws: Path, long_steps: int, stream_steps: int) -> dict[str, dict]:
    """The batched deployment's scenarios (each leaves the replica's queue empty)."""
    import mlflow

    def move() -> str:
        register_quickstart(ws, seed=1, alias=None)
        client = mlflow.MlflowClient()
        version = max(int(v.version) for v in client.search_model_versions("name='serve-bench'"))
        client.set_registered_model_alias("serve-bench", "champion", str(version))
        return str(version)

    runs = {"mixed": lambda: mixed(url, long_steps, args.seconds),
            "aborted": lambda: aborted(url, long_steps),
            "streams": lambda: streams(url, stream_steps),
            "rollout": lambda: rollout(url, move, 40 if args.quick else 100, args.reload_interval)}
    out = {}
    for name in args.scenarios:
        out[name] = asyncio.run(runs[name]())
        print(name, json.dumps(out[name]), file=sys.stderr, flush=True)
    return out


def table(results: list[dict], bound: dict) -> str:
    head = (f"{'mode':<10}{'c':>4}{'img/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'errors':>7}"
            f"{'rows/fw':>9}{'fw ms':>8}{'fw cpu':>8}{'ovh ms':>8}{'runq':>7}{'gil':>7}{'busy':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        e = r.get("engine", {})
        lines.append(f"{r['mode']:<10}{r['concurrency']:>4}{r['images_per_s']:>9.2f}{r['p50_ms']:>9.1f}"
                     f"{r['p99_ms']:>9.1f}{(r['mean_batch_size'] or 0):>7.1f}{r['errors']:>7}"
                     f"{e.get('mean_rows', 0):>9.2f}{e.get('forward_ms', 0):>8.1f}{e.get('forward_cpu_ms', 0):>8.1f}"
                     f"{e.get('overhead_ms', 0):>8.2f}{e.get('step_runq_ms', 0):>7.1f}{e.get('step_gil_ms', 0):>7.1f}"
                     f"{e.get('busy', 0):>6.2f}")
    lines.append(f"model-only bound at batch {bound['batch']}: {bound['images_per_s']} img/s "
                 f"({bound['forward_ms']} ms per forward)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
