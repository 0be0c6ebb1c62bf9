"""Dynamic-batching logic of the sampling endpoint as plain functions (unit-testable without Ray Serve).

A ``@serve.batch`` call receives a list of :class:`SampleJob`. :func:`run_jobs` groups them by
(sampler, steps, eta, guidance_scale), runs ONE sampling call per group and splits the images back per job.
Each job's noise comes from its own ``torch.Generator`` seeded with the job's seed, handed to the sampler as a
per-row list (the job's generator repeated for each of its rows, rows in order), so a job's images do not depend
on which other jobs share its batch (see ``diffusion_core.rng``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class SampleJob:
    """One request's sampling work (validated before it gets here)."""

    num_samples: int
    seed: int
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    class_labels: list[int] | None = None
    received_at: float = field(default_factory=time.time)  # wall clock, for the queue time

    def group_key(self) -> tuple[str, int, float, float]:
        return (self.sampler, int(self.steps), float(self.eta), float(self.guidance_scale))


@dataclass
class JobResult:
    """A job's images ([n, C, H, W] in [-1, 1], CPU) or the error that stopped its group."""

    images: torch.Tensor | None
    batch_size: int  # images produced by the sampling run that served this job
    queue_ms: float
    sample_ms: float
    error: str | None = None


class Sampler(Protocol):  # the part of pipelines.model_io.DiffusionSampler used here
    def labels_for(self, num_samples: int, class_labels: list[int] | None) -> torch.Tensor | None: ...

    def sample(self, num_samples: int, **kwargs: Any) -> torch.Tensor: ...

    def sample_progressive(self, num_samples: int, **kwargs: Any) -> Iterator[dict]: ...


def images_in(jobs: Sequence[SampleJob]) -> int:
    """Batch size as images (``batch_size_fn`` of ``@serve.batch``): the sum of the jobs' ``num_samples``."""
    return sum(int(j.num_samples) for j in jobs)


def group_jobs(jobs: Sequence[SampleJob]) -> list[list[int]]:
    """Indices of ``jobs`` grouped by :meth:`SampleJob.group_key`, groups in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.group_key(), []).append(i)
    return list(groups.values())


def row_generators(jobs: Sequence[SampleJob]) -> list[torch.Generator]:
    """One CPU generator per job seeded with its seed, repeated once per row of that job."""
    rows: list[torch.Generator] = []
    for job in jobs:
        g = torch.Generator().manual_seed(int(job.seed))
        rows.extend([g] * int(job.num_samples))
    return rows


def row_labels(sampler: Sampler, jobs: Sequence[SampleJob]) -> list[int] | None:
    """Every row's class label: each job's labels resolved as if it ran alone, concatenated (None: unconditional)."""
    per_job = [sampler.labels_for(int(j.num_samples), j.class_labels) for j in jobs]
    if all(labels is None for labels in per_job):
        return None
    return [int(c) for labels in per_job for c in labels.tolist()]


def split_rows(x: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """Split a batch along dim 0 into consecutive chunks of ``counts`` rows."""
    if sum(counts) != x.shape[0]:
        raise ValueError(f"cannot split {x.shape[0]} rows into {list(counts)}")
    return list(torch.split(x, list(counts), dim=0))


def run_group(sampler: Sampler, jobs: Sequence[SampleJob]) -> list[torch.Tensor]:
    """ONE sampling call for jobs sharing a group key; returns each job's images."""
    sampler_name, steps, eta, guidance = jobs[0].group_key()
    if any(j.group_key() != jobs[0].group_key() for j in jobs):
        raise ValueError("run_group needs jobs with one (sampler, steps, eta, guidance_scale)")
    counts = [int(j.num_samples) for j in jobs]
    x = sampler.sample(sum(counts), sampler=sampler_name, steps=steps, eta=eta, guidance_scale=guidance,
                       class_labels=row_labels(sampler, jobs), generator=row_generators(jobs))
    return [chunk.detach().to("cpu") for chunk in split_rows(x, counts)]


def run_jobs(sampler: Sampler, jobs: Sequence[SampleJob]) -> list[JobResult]:
    """Serve one ``@serve.batch`` call: one sampling run per group; a failing group fails only its own jobs."""
    results: list[JobResult | None] = [None] * len(jobs)
    for idx in group_jobs(jobs):
        group = [jobs[i] for i in idx]
        start = time.time()
        n = images_in(group)
        try:
            images = run_group(sampler, group)
            error = None
        except (ValueError, RuntimeError) as e:  # e.g. a bound the request checks missed
            images, error = [None] * len(group), f"{type(e).__name__}: {e}"
        sample_ms = (time.time() - start) * 1000
        for i, img in zip(idx, images, strict=True):
            queue_ms = max(0.0, (start - jobs[i].received_at) * 1000)
            results[i] = JobResult(images=img, batch_size=n, queue_ms=queue_ms, sample_ms=sample_ms, error=error)
    return results  # type: ignore[return-value]


def default_preview_every(steps: int) -> int:
    """About four previews per run."""
    return max(1, int(steps) // 4)


def progressive_events(sampler: Sampler, job: SampleJob, preview_every: int | None = None) -> Iterator[dict]:
    """The streaming endpoint's events for one job (never batched with others; same noise as :func:`run_jobs`).

    Yields ``{"event": "preview", "step", "total", "images": pred_x0}`` every ``preview_every`` steps (not at the
    last step), then ``{"event": "final", "step", "total", "images": x0}``.
    """
    k = preview_every or default_preview_every(job.steps)
    last = None
    for out in sampler.sample_progressive(int(job.num_samples), sampler=job.sampler, steps=job.steps,
                                          eta=job.eta, guidance_scale=job.guidance_scale,
                                          class_labels=row_labels(sampler, [job]),
                                          generator=row_generators([job])):
        last = out
        if out["step"] % k == 0 and out["step"] < out["total"]:
            yield {"event": "preview", "step": out["step"], "total": out["total"],
                   "images": out["pred_xstart"].detach().to("cpu")}
    if last is None:
        raise RuntimeError("the sampler yielded no steps")
    yield {"event": "final", "step": last["step"], "total": last["total"], "images": last["sample"].detach().to("cpu")}
