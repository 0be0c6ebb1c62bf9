"""Training throughput on the local 2-node cluster vs a local 2-worker run of the same config.

    python infra/local/bench_train.py [--steps 200] [--quick]      # needs `make cluster-up` first

Both runs train configs/cluster_local.yaml (2 Train workers x 1 thread, batch 32 per worker) for the same number
of steps: once submitted to the cluster (`ray job submit`, shards and checkpoints on S3, MLflow server), once on a
local Ray with local shards and MLflow on SQLite. The throughput is the median of the ``images_per_sec`` windows
rank 0 logs to MLflow, leaving out the first (start-up). Prints a table; JSON to
benchmarks/results/cluster_train.json with the load average (target: cluster >= 0.9x local).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster as lc  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
CONFIG = "configs/cluster_local.yaml"


def _windows(client, run_name: str) -> list[float]:
    exp = client.get_experiment_by_name("diffusion-pipeline")
    runs = client.search_runs([exp.experiment_id], f"tags.ray_run_name = '{run_name}'")
    history = sorted(client.get_metric_history(runs[0].info.run_id, "images_per_sec"), key=lambda m: m.step)
    return [m.value for m in history[1:]]


EXTRA: list[str] = []  # --set overrides for both runs


def _sets(run_name: str, steps: int) -> list[str]:
    return [f"train.run_name={run_name}", f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
            "train.sample_every=1000000", "train.log_every=20", *EXTRA]


def run_cluster(steps: int) -> tuple[list[float], float]:
    import mlflow

    name = f"bench-cluster-{int(time.time())}"
    t0 = time.time()
    proc = lc.submit_job(CONFIG, _sets(name, steps), ["--until", "train"], capture=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr)[-3000:])
    return _windows(mlflow.MlflowClient(lc.load_endpoints().mlflow_url), name), time.time() - t0


def run_local(steps: int) -> tuple[list[float], float]:
    import mlflow

    ws = Path(tempfile.mkdtemp(prefix="bench-local-"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_", "RAY_AUTH"))}
    sets = [*_sets("bench-local", steps), "train.storage_path=null", "workspace.store=null", "ray.address=null",
            f"workspace.root={ws}"]
    argv = [str(lc.BIN / "diffusion-pipeline"), "run", "--config", CONFIG, "--until", "train",
            *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    proc = subprocess.run(argv, env=env, cwd=lc.ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr)[-3000:])
    return _windows(mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}"), "bench-local"), time.time() - t0


@app.command()
def main(steps: int = typer.Option(200, help="Optimizer steps per run."),
         quick: bool = typer.Option(False, help="60 steps (checks the script works; numbers are noisy)."),
         set_: list[str] = typer.Option([], "--set", help="Config overrides for both runs."),
         only: str = typer.Option("both", help="both | cluster | local")) -> None:
    steps = 60 if quick else steps
    EXTRA[:] = set_
    if only != "both":
        windows, wall = (run_cluster if only == "cluster" else run_local)(steps)
        typer.echo(f"{only}: median {statistics.median(windows):.1f} img/s, windows {windows}, {wall:.0f} s, "
                   f"load {os.getloadavg()}")
        return
    load_before = os.getloadavg()
    cl, cl_wall = run_cluster(steps)
    lo, lo_wall = run_local(steps)
    res = {"steps": steps, "overrides": set_, "cluster_images_per_sec": statistics.median(cl), "local_images_per_sec":
           statistics.median(lo), "cluster_windows": cl, "local_windows": lo, "cluster_wall_s": cl_wall,
           "local_wall_s": lo_wall, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    res["ratio"] = res["cluster_images_per_sec"] / res["local_images_per_sec"]
    typer.echo(f"{'run':<28}{'img/s (median)':>16}{'wall s':>10}")
    typer.echo(f"{'2-node cluster (S3, server)':<28}{res['cluster_images_per_sec']:>16.1f}{cl_wall:>10.0f}")
    typer.echo(f"{'local 2 workers':<28}{res['local_images_per_sec']:>16.1f}{lo_wall:>10.0f}")
    typer.echo(f"ratio cluster/local: {res['ratio']:.2f} (target >= 0.9); load average {load_before}")
    out = lc.ROOT / "benchmarks" / "results" / "cluster_train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
