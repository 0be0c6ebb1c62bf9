"""prepare_data scaling: an image folder written as shards serially (1 task, in-process) vs N parallel Ray tasks.

The benchmark generates its own input (no download): ``--images`` JPEGs of ``--src-size`` px in 10 class folders,
prepared at ``--size`` px RGB. Every setting runs ``--repeats`` times, interleaved, into a fresh workspace (median reported),
after the Ray workers have been started once (a warm cluster; worker start-up is not what is measured); the
speedup is reported both as the ratio of the medians and paired (the median of the per-round ratios). Each
parallel output is checked byte-for-byte against the serial one. Prints a table and writes
benchmarks/results/prepare_scaling.json with the load average before/after (numbers from a busy machine mean
little: run it on a quiet one).

    python benchmarks/prepare_scaling.py              # 20k JPEGs 64x64 -> 32x32, 1 vs 2 tasks
    python benchmarks/prepare_scaling.py --quick      # 2k images, one repeat: checks that it works
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def make_image_folder(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``root/c<k>/<i>.jpg``: smooth colour gradients plus noise (JPEG-compressible, not constant)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, 3)
        img = np.stack([a * xx + (255 - a) * yy, b * yy + c * (1 - xx), (a + b) / 2 * (xx * yy) + c / 2], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=90)


def shard_bytes(res) -> dict[str, bytes]:
    from pipelines import storage

    return {u.rsplit("/", 2)[-2] + "/" + u.rsplit("/", 1)[-1]: storage.read_bytes(u)
            for u in [*res.train_urls, *res.test_urls]}


def _write_some(src: str, size: int, samples_per_shard: int, n_shards: int, out: str) -> float:
    """Seconds to write the first ``n_shards`` shards of ``src`` in this process (no Ray): the plain CPU work."""
    from pipelines.config import load_config
    from pipelines.data.prepare import _make_source, shard_jobs, write_shard

    cfg = load_config(None, ["data.source=image_folder", f"data.path={src}", f"data.image_size={size}",
                             "data.channels=3", f"data.samples_per_shard={samples_per_shard}"])
    jobs = shard_jobs(_make_source(cfg.data).load().splits, samples_per_shard)[:n_shards]
    t0 = time.perf_counter()
    for job in jobs:
        write_shard(out, job, cfg.data)
    return time.perf_counter() - t0


def hardware_scaling(src: Path, args: argparse.Namespace, work: Path, n_shards: int = 10) -> dict:
    """The machine's own limit for this work: the same shards written by 1 process vs by 2 processes at once
    (each the whole amount), interleaved; limit = 2 x t(1) / t(2 at once), with no Ray and no coordination."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    one, two = [], []
    with ctx.Pool(2) as pool:
        a = (str(src), args.size, args.samples_per_shard, n_shards)
        pool.starmap(_write_some, [(*a, str(work / "hw-w0")), (*a, str(work / "hw-w1"))])  # warm both
        for _ in range(args.repeats):
            one.append(pool.apply(_write_some, (*a, str(work / "hw-0"))))
            two.append(max(pool.starmap(_write_some, [(*a, str(work / "hw-1")), (*a, str(work / "hw-2"))])))
    return {"shards_per_process": n_shards, "one_process_s": one, "two_processes_s": two,
            "limit": 2 * statistics.median(one) / statistics.median(two)}


def run(args: argparse.Namespace) -> dict:
    import ray

    from pipelines.config import load_config
    from pipelines.data import prepare_data

    work = Path(args.workdir or tempfile.mkdtemp(prefix="prepare-scaling-"))
    src = work / "images"
    if not src.exists():
        t0 = time.perf_counter()
        make_image_folder(src, args.images, args.src_size)
        print(f"generated {args.images} JPEGs {args.src_size}x{args.src_size} in {time.perf_counter() - t0:.1f} s")
    load_before = os.getloadavg()
    ray.init(num_cpus=max(args.tasks), include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             configure_logging=False, log_to_driver=False)
    ray.get([ray.remote(lambda: __import__("pipelines.data.prepare")).options(num_cpus=1).remote()
             for _ in range(max(args.tasks))])  # warm workers
    times: dict[int, list[float]] = {tasks: [] for tasks in args.tasks}
    reference = None
    try:
        for r in range(args.repeats):  # interleaved (1, 2, 1, 2, ...): machine drift hits every setting alike
            for tasks in args.tasks:
                shutil.rmtree(work / f"ws-{tasks}-{r}", ignore_errors=True)  # fresh: a prepared one is skipped
                cfg = load_config(None, ["data.source=image_folder", f"data.path={src}", f"data.image_size={args.size}",
                                         "data.channels=3", f"data.samples_per_shard={args.samples_per_shard}",
                                         f"data.prepare_tasks={tasks}", f"workspace.root={work}/ws-{tasks}-{r}"])
                t0 = time.perf_counter()
                res = prepare_data(cfg, progress=False)
                times[tasks].append(time.perf_counter() - t0)
                out = shard_bytes(res)
                if reference is None:
                    reference = (res.fingerprint, out)
                elif (res.fingerprint, out) != reference:
                    raise AssertionError(f"{tasks} tasks wrote different bytes than the serial run")
        rows = [{"tasks": tasks, "seconds": statistics.median(ts), "all_seconds": ts,
                 "images_per_sec": args.images / statistics.median(ts)} for tasks, ts in times.items()]
    finally:
        ray.shutdown()
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
        # the median of the per-round ratios: a slow phase of the machine hits both sides of a round alike
        row["paired_speedup"] = statistics.median(
            a / b for a, b in zip(rows[0]["all_seconds"], row["all_seconds"], strict=True))
    hw = hardware_scaling(src, args, work)
    return {"benchmark": "prepare_scaling", "images": args.images, "src_size": args.src_size, "size": args.size,
            "samples_per_shard": args.samples_per_shard, "repeats": args.repeats, "quick": args.quick,
            "rows": rows, "hardware_2_process_limit": hw, "byte_identical": True, "cpu_count": os.cpu_count(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "python": platform.python_version(),
            "ray_version": ray.__version__, "unix_time": time.time()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--src-size", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--samples-per-shard", type=int, default=500)
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 2], help="task counts to compare (first = baseline)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2,000 images, 1 repeat (checks that it works)")
    p.add_argument("--workdir", default=None, help="reuse a folder (the generated images are kept there)")
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "prepare_scaling.json"))
    args = p.parse_args()
    if args.quick:
        args.images, args.repeats, args.samples_per_shard = 2_000, 1, 200
    result = run(args)
    print(f"\n{args.images} images {args.src_size}px -> {args.size}px, median of {args.repeats}; "
          f"load average before {result['loadavg_before'][0]:.2f}, after {result['loadavg_after'][0]:.2f}")
    print(f"{'tasks':>5} {'seconds':>9} {'images/s':>10} {'speedup':>8} {'paired':>7}")
    for row in result["rows"]:
        print(f"{row['tasks']:>5} {row['seconds']:>9.2f} {row['images_per_sec']:>10.0f} {row['speedup']:>7.2f}x "
              f"{row['paired_speedup']:>6.2f}x")
    hw = result["hardware_2_process_limit"]
    print(f"hardware limit, the same shards in 1 vs 2 plain processes at once (no Ray): {hw['limit']:.2f}x")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
