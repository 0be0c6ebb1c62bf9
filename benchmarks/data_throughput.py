"""Is the shard loader ever the bottleneck? Loader images/s vs. training-step images/s on this CPU.

    .venv/bin/python benchmarks/data_throughput.py [--seconds 8] [--threads 2] [--out benchmarks/results/...]

1. Loader: a temp set of 32x32 RGB shards (CIFAR-like smooth images, PNG) read by ``make_loader`` in resampled
   mode with decode + random flip + shuffle, for 0/1/2 DataLoader workers; also 16x16 L (the quickstart data).
2. Training consumption: forward + backward + AdamW step of the real UNet presets with the diffusion MSE loss
   (``UNet.quickstart`` at 16x16x1, batch 64 = train.batch_size; ``UNet.ddpm_cifar10`` at 32x32x3, batch 8),
   on synthetic tensors, ``--threads`` torch threads. Falls back to a small stand-in conv net if the core is
   missing.
3. In situ: quickstart training steps fed by the loader (1 worker, sharing the same cores) vs. fed by a fixed
   tensor; the slowdown is what the data path really costs.
Prints a table and writes ``benchmarks/results/data_throughput.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.data import make_loader  # noqa: E402


def write_shards(directory: Path, *, n_shards: int, per_shard: int, size: int, channels: int) -> list[str]:
    """Smooth random images (8x8 noise upsampled + mild noise): PNGs of CIFAR-like size (~2-3 KB at 32x32x3)."""
    rng = np.random.default_rng(0)
    urls = []
    for s in range(n_shards):
        path = directory / f"bench-{size}-{channels}-{s:06d}.tar"
        with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
            for j in range(per_shard):
                low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
                arr = np.clip(np.asarray(img, np.int16) + rng.integers(-8, 9, (size, size, 3)), 0, 255)
                img = Image.fromarray(arr.astype(np.uint8))
                img = img.convert("L") if channels == 1 else img
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                w.write({"__key__": f"s{s:04d}_{j:05d}", "png": buf.getvalue(), "cls": str(j % 10).encode()})
        urls.append(str(path))
    return urls


def _measure(step, seconds: float, warmup: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) over >= ``seconds`` and >= 1 step.

    The CPU-time rate is what the code costs regardless of other load on the machine (it counts every thread
    of this process, so it is only comparable for 1-thread, 0-worker measurements)."""
    for _ in range(warmup):
        step()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds or n == 0:
        n += step()
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def loader_rate(urls: list[str], *, workers: int, batch: int, channels: int, seconds: float) -> tuple[float, float]:
    loader = make_loader(urls, rank=0, world_size=1, batch_size=batch, num_workers=workers, resampled=True,
                         shuffle_buffer=1000, random_flip=True, channels=channels)
    it = iter(loader)
    return _measure(lambda: len(next(it)[0]), seconds, warmup=3)  # warm-up: worker start, shuffle buffer fill


class StandIn(torch.nn.Module):
    """Used only when diffusion_core is not importable: a few convs with a timestep bias."""

    def __init__(self, c: int, width: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(c, width, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(width, c, 3, padding=1))

    def forward(self, x, t, y=None):
        return self.net(x) + (t.float() / 1000).view(-1, 1, 1, 1)


def build(preset: str):
    """(model, loss_fn(model, x, y) -> scalar, name) for a preset."""
    try:
        from diffusion_core import create_diffusion
        from diffusion_core.models import UNet

        model = UNet.quickstart(image_size=16, in_channels=1, num_classes=10) if preset == "quickstart" \
            else UNet.ddpm_cifar10()
        diffusion = create_diffusion(learn_sigma=False)

        def loss_fn(m, x, y):
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],))
            kw = {"y": y} if preset == "quickstart" else {}
            return diffusion.training_losses(m, x, t, model_kwargs=kw)["loss"].mean()

        return model, loss_fn, f"UNet.{preset}"
    except ImportError:
        model = StandIn(1 if preset == "quickstart" else 3)

        def loss_fn(m, x, y):  # eps-prediction MSE on a linear schedule (Ho et al. 2020, Eq. 14)
            t = torch.randint(0, 1000, (x.shape[0],))
            abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)[t].view(-1, 1, 1, 1)
            eps = torch.randn_like(x)
            return ((m(abar.sqrt() * x + (1 - abar).sqrt() * eps, t) - eps) ** 2).mean()

        return model, loss_fn, f"stand-in conv net ({preset})"


def train_rate(preset: str, *, batch: int, size: int, channels: int, seconds: float, warmup: int = 2,
               batches=None) -> tuple[float, float, str]:
    """(images/s wall, images per CPU second, name) of training steps; ``batches``: an iterator of (x, y),
    else one fixed synthetic batch."""
    torch.manual_seed(0)
    model, loss_fn, name = build(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fixed = (torch.rand(batch, channels, size, size) * 2 - 1, torch.randint(0, 10, (batch,)))

    def step():
        x, y = next(batches) if batches is not None else fixed
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return len(x)

    return (*_measure(step, seconds, warmup), name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement time per row")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the training measurements")
    ap.add_argument("--cifar-batch", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = ap.parse_args()
    rows: list[dict] = []

    def row(what: str, wall: float, cpu: float | None = None) -> None:
        rows.append({"what": what, "images_per_s": wall, "images_per_cpu_s": cpu})

    with tempfile.TemporaryDirectory() as tmp:
        rgb = write_shards(Path(tmp), n_shards=8, per_shard=512, size=32, channels=3)
        gray = write_shards(Path(tmp), n_shards=8, per_shard=512, size=16, channels=1)
        torch.set_num_threads(1)  # as inside DataLoader workers (the 0-worker rows run in this process)
        for data, urls, c in (("32x32 RGB", rgb, 3), ("16x16 L", gray, 1)):
            for workers in (0, 1, 2):
                wall, cpu = loader_rate(urls, workers=workers, batch=64, channels=c, seconds=args.seconds)
                row(f"loader {data}, decode+flip, {workers} worker(s)", wall, cpu if workers == 0 else None)
        torch.set_num_threads(1)  # cost per CPU second, comparable with the 0-worker loader row
        q1, q_cpu, qname = train_rate("quickstart", batch=64, size=16, channels=1, seconds=args.seconds)
        row(f"train step {qname} 16x16x1 batch 64, 1 thread", q1, q_cpu)
        torch.set_num_threads(args.threads)
        q, _, _ = train_rate("quickstart", batch=64, size=16, channels=1, seconds=args.seconds)
        row(f"train step {qname} 16x16x1 batch 64, {args.threads} thread(s)", q)
        c10, _, cname = train_rate("cifar10", batch=args.cifar_batch, size=32, channels=3, seconds=args.seconds,
                                   warmup=1)
        row(f"train step {cname} 32x32x3 batch {args.cifar_batch}, {args.threads} thread(s)", c10)
        fed_loader = make_loader(gray, rank=0, world_size=1, batch_size=64, num_workers=1, resampled=True,
                                 shuffle_buffer=1000, random_flip=True, channels=1)
        fed, _, _ = train_rate("quickstart", batch=64, size=16, channels=1, seconds=args.seconds,
                               batches=iter(fed_loader))
        row(f"train step {qname} fed by the loader (1 worker), {args.threads} thread(s)", fed)
    loader_rows = [r for r in rows if r["what"].startswith("loader 32x32 RGB")]
    loader_32_rgb = max(r["images_per_s"] for r in loader_rows)
    loader_cpu = loader_rows[0]["images_per_cpu_s"]
    summary = {
        "loader_32x32_rgb_best_images_per_s": loader_32_rgb,
        "quickstart_train_images_per_s": q,
        "cifar10_train_images_per_s": c10,
        "loader_over_quickstart (wall)": loader_32_rgb / q,
        "loader_over_cifar10 (wall)": loader_32_rgb / c10,
        "loader_over_quickstart (per CPU second, 1 core each)": loader_cpu / q_cpu,
        "quickstart_slowdown_when_fed_by_loader": 1 - fed / q,
        "target_met (>=10x quickstart)": min(loader_32_rgb / q, loader_cpu / q_cpu) >= 10,
    }
    env = {"python": platform.python_version(), "torch": torch.__version__, "webdataset": wds.__version__,
           "cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0], "seconds_per_row": args.seconds,
           "unix_time": time.time()}
    width = max(len(r["what"]) for r in rows)
    print(f"{'measurement':<{width}}    images/s  images/CPU-s")
    for r in rows:
        cpu = f"{r['images_per_cpu_s']:12.1f}" if r["images_per_cpu_s"] else f"{'':>12}"
        print(f"{r['what']:<{width}}  {r['images_per_s']:10.1f}  {cpu}")
    for k, v in summary.items():
        print(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}")
    print(f"(1-minute load average at the end: {env['load_avg_1m_at_end']:.2f} on {env['cpus']} CPUs)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary, "env": env}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
