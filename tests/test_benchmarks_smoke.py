"""The prepared benchmark scripts still run (CPU, quick mode) and write the JSON their readers expect."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_runs_on_cpu_quick(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--device", "cpu", "--quick",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite_cpu.json").read_text())
    assert report["device"] == "cpu" and report["quick"] is True
    assert len(report["loadavg_before"]) == 3 and report["fast_defaults"]["device_type"] == "cpu"
    train = {(r["variant"], r["batch"]) for r in report["train"]}
    assert {("eager", 2), ("eager_contiguous", 2)} <= train
    assert all(r["images_per_s"] > 0 for r in report["train"] + report["sampling"])
    assert {(r["variant"], r["batch"]) for r in report["sampling"]} == {("eager", 1), ("eager", 2)}
    assert "[gpu_suite] done" in proc.stdout
