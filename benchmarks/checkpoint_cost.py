"""What a validated checkpoint costs: TrainState.save (with its manifest) and validate_checkpoint, per preset.

    .venv/bin/python benchmarks/checkpoint_cost.py [--quick] [--out benchmarks/results/checkpoint_cost.json]

For each UNet preset (``quickstart`` at 16x16x1; ``ddpm_cifar10`` at 32x32x3 unless ``--quick``) one AdamW step
fills the optimizer moments, then the rank-0 checkpoint is written to a temp directory, validated (size and
SHA-256 of every file: the check a resume runs before it uses a checkpoint) and loaded into a fresh state
(load includes that validation again).
Prints a table and writes JSON with the load average (timings on a shared machine are indicative only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipelines.config import ModelConfig, TrainConfig
from pipelines.model_io import build_unet
from pipelines.train_state import TrainState, validate_checkpoint

PRESETS = {"quickstart": (16, 1), "ddpm_cifar10": (32, 3)}


def _state(preset: str, size: int, channels: int) -> TrainState:
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(preset=preset, class_conditional=False), image_size=size, channels=channels,
                      num_classes=0, learn_sigma=False)
    return TrainState.create(unet, None, TrainConfig(), device=torch.device("cpu"))


def measure(preset: str, repeats: int) -> dict:
    size, channels = PRESETS[preset]
    state = _state(preset, size, channels)
    x = torch.randn(2, channels, size, size)
    state.model(x, torch.zeros(2, dtype=torch.long)).square().mean().backward()
    state.optimizer.step()
    saves, checks, loads = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()
            state.save(tmp)
            t1 = time.perf_counter()
            assert validate_checkpoint(tmp) == []
            t2 = time.perf_counter()
            fresh = _state(preset, size, channels)
            t3 = time.perf_counter()
            fresh.load(tmp)
            t4 = time.perf_counter()
            saves.append(t1 - t0), checks.append(t2 - t1), loads.append(t4 - t3)  # load validates again
        mb = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2**20
    params = sum(p.numel() for p in state.model.parameters())
    return {"preset": preset, "params": params, "checkpoint_mb": round(mb, 1), "save_s": min(saves),
            "validate_s": min(checks), "load_s": min(loads), "validate_mb_per_s": round(mb / min(checks), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="quickstart preset only, one repeat")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "checkpoint_cost.json")
    args = ap.parse_args()
    presets = ["quickstart"] if args.quick else list(PRESETS)
    rows = [measure(p, 1 if args.quick else 3) for p in presets]
    print(f"{'preset':<14}{'params':>12}{'MB':>9}{'save s':>9}{'validate s':>12}{'load s':>9}{'MB/s':>9}")
    for r in rows:
        print(f"{r['preset']:<14}{r['params']:>12,}{r['checkpoint_mb']:>9}{r['save_s']:>9.3f}{r['validate_s']:>12.3f}"
              f"{r['load_s']:>9.3f}{r['validate_mb_per_s']:>9}")
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "load_avg_1m_at_end": os.getloadavg()[0], "quick": args.quick}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "env": env}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
