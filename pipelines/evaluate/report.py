"""The evaluation report: sample grids, the sampler table, ``report.json`` and ``report.md`` in one local
directory (``<workspace>/outputs/evaluate/<name>-v<version>/``), which the stage then logs as MLflow artifacts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipelines.config import EvaluateConfig, PipelineConfig, SamplerSpec


class SamplerRow(BaseModel):
    """One row of the sampler table (quality on the embedded metric, wall-clock cost)."""

    sampler: str
    steps: int
    num_samples: int
    seconds_per_image: float
    frechet_distance: float | None = None
    class_accuracy: float | None = None
    inception_score: float | None = None
    grid_path: str | None = None


def output_dir(cfg: PipelineConfig, name: str | None, version: str | None, run_id: str) -> Path:
    """Where one evaluation's files go: ``outputs/evaluate/<name>-v<version>`` (or the run id)."""
    slug = f"{name}-v{version}" if name and version else run_id
    return cfg.workspace.outputs / "evaluate" / re.sub(r"[^A-Za-z0-9_.-]+", "_", slug)


def write_grids(out_dir: Path, outs: dict[str, dict[str, Any]], weights: str) -> dict[str, str]:
    """Write each sampler output's PNG grid as ``samples/<sampler><steps>_<weights>.png``; ``{job name: path}``."""
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    paths = {}
    for job, o in outs.items():
        p = out_dir / "samples" / f"{o['sampler']}{o['steps']}_{weights}.png"
        p.write_bytes(o.pop("grid_png"))
        paths[job] = str(p)
    return paths


def sampler_rows(ev: EvaluateConfig, outs: dict[str, dict[str, Any]], grids: dict[str, str]) -> list[SamplerRow]:
    """The rows of ``evaluate.sampler_table``, in its order (the gate sampler's row only if the table lists it)."""
    by_spec = {(o["sampler"], o["steps"]): (job, o) for job, o in outs.items()}
    rows = []
    for s in ev.sampler_table:
        job, o = by_spec[(s.sampler, s.steps)]
        rows.append(SamplerRow(**{k: o.get(k) for k in SamplerRow.model_fields if k != "grid_path"},
                               grid_path=grids[job]))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[SamplerRow]) -> str:
    lines = ["| sampler | steps | Frechet distance (embedded) | class accuracy | IS-style | s / image |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.sampler} | {r.steps} | {_fmt(r.frechet_distance)} | {_fmt(r.class_accuracy)} | "
                     f"{_fmt(r.inception_score)} | {_fmt(r.seconds_per_image)} |")
    return "\n".join(lines) + "\n"


def report_md(uri: str, metrics: dict[str, float], rows: list[SamplerRow], skipped: dict[str, str],
              reference: dict[str, Any], gate: SamplerSpec, num_samples: int) -> str:
    """The human-readable report: gate metrics, how to read them, the sampler table, what was skipped."""
    parts = [f"# Evaluation of `{uri}`\n",
             f"Gate sampler: {gate.sampler} {gate.steps} steps, {num_samples} samples (EMA weights).\n",
             "| metric | value |", "|---|---:|"]
    parts += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    parts.append("\nReading the embedded numbers: `frechet_distance_real` is the real-vs-real baseline (a train "
                 "subset of the same size vs the held-out split); `frechet_ratio` = model / baseline.\n")
    if rows:
        parts += [f"## Sampler table ({rows[0].num_samples} samples per row)\n", markdown_table(rows)]
    if skipped:
        parts += ["## Skipped / notes\n"] + [f"- **{k}**: {v}" for k, v in skipped.items()]
    parts.append(f"\nReference classifier: `{(reference.get('classifier') or {}).get('key')}` "
                 f"(data fingerprint `{reference.get('data_fingerprint')}`).\n")
    return "\n".join(parts) + "\n"


def write_report(out_dir: Path, report: dict[str, Any], md: str, rows: list[SamplerRow]) -> None:
    """``report.json``, ``report.md`` and (when there are rows) ``sampler_table.md`` into ``out_dir``."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(md)
    if rows:
        (out_dir / "sampler_table.md").write_text(markdown_table(rows))
