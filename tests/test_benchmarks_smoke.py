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


@pytest.mark.slow
def test_perf_suite_quick_reports_the_default_autocast_against_its_own_matmul_rate(tmp_path: Path) -> None:
    from diffusion_core.models import fast_defaults

    out, md = tmp_path / "perf.json", tmp_path / "perf.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "perf_suite.py"), "--quick", "--threads", "1",
                           "--rounds", "1", "--sections", "train,autocast", "--out", str(out), "--markdown", str(md)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    amp = fast_defaults("cpu")["train_autocast_dtype"]
    assert report["train_autocast_dtype"] == amp and set(report["matmul_2048_gflop_per_s"]) == {"float32", "bfloat16"}
    train = {r["variant"]: r for r in report["training"]["rows"] if r["mode"] == "train"}
    assert set(train) == {"ours", "ours_fp32", "ours_plain_opt", "diffusers", "diffusers_best", "diffusers_best_fp32"}
    # the default rows run in the per-device dtype; diffusers as shipped and the *_fp32 rows in fp32
    assert train["ours"]["dtype"] == train["diffusers_best"]["dtype"] == amp
    assert {train[v]["dtype"] for v in ("ours_fp32", "diffusers", "diffusers_best_fp32")} == {"float32"}
    flop_rows = [r for r in report["summary"] if "matmul" in r["what"]]
    assert flop_rows and all(r["reference"] > 0 and 0 < r["ratio"] for r in flop_rows)
    mm = report["training"]["matmul_gflop_per_s"]
    for r in flop_rows:  # each FLOP rate against the matmul of its own dtype, timed in the same interleaved rounds
        mode, dtype = r["what"].split()[0], r["what"].split("(")[1].split(")")[0]
        assert set(mm[mode]) == {"float32", "bfloat16"} and r["reference"] == pytest.approx(mm[mode][dtype])
    assert md.read_text().startswith("perf_suite: torch")
    assert "| what | ours | reference | ratio | paired | target |" in md.read_text()
    train_ratios = [r for r in report["summary"] if r["what"].startswith("train step")]
    # one round: the median of per-round ratios is that round's ratio, i.e. the ratio of the two medians
    assert train_ratios and all(r["paired"] == pytest.approx(r["ratio"], rel=1e-9) for r in train_ratios)
