"""Runs named evaluation jobs as Ray tasks, at most ``evaluate.concurrency`` in flight, and returns their results
by name (no positions to keep in step with the job list)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.config import EvaluateConfig

Job = tuple[Callable[..., Any], tuple]


class TaskRunner:
    """Runs task bodies as Ray tasks (``evaluate.cpus_per_task`` CPUs, a GPU each when ``evaluate.use_gpu``) or,
    inside a task that already holds the GPU the sub-tasks would need, in this process (a blocked task keeps its
    GPU, so sub-tasks could never start)."""

    def __init__(self, ev: EvaluateConfig):
        import ray

        self.ray = ray
        self.limit = ev.concurrency
        self.options = {"num_cpus": ev.cpus_per_task, "num_gpus": 1 if ev.use_gpu else 0, "max_retries": 1}
        in_worker = ray.get_runtime_context().worker.mode == ray.WORKER_MODE  # inside a task/actor
        self.inline = bool(ev.use_gpu and in_worker and ray.get_gpu_ids())
        self.threads = max(1, int(ev.cpus_per_task))

    def put(self, obj: Any) -> Any:
        """An argument shared by several jobs: stored once in the object store (as is, when running inline)."""
        return obj if self.inline else self.ray.put(obj)

    def run(self, jobs: dict[str, Job], desc: str) -> dict[str, Any]:
        """``{name: fn(*args)}`` for each named job, submitted in the dict's order; a progress bar counts finished
        jobs."""
        from tqdm.auto import tqdm

        results: dict[str, Any] = {}
        with tqdm(total=len(jobs), desc=desc, unit="task", leave=False) as bar:
            if self.inline:
                for name, (fn, args) in jobs.items():
                    results[name] = fn(*args)
                    bar.update()
                return results
            pending: dict[Any, str] = {}
            queue = list(jobs.items())
            while queue or pending:
                while queue and len(pending) < self.limit:
                    name, (fn, args) = queue.pop(0)
                    pending[self.ray.remote(fn).options(**self.options).remote(*args)] = name
                done, _ = self.ray.wait(list(pending), num_returns=1)
                for ref in done:
                    results[pending.pop(ref)] = self.ray.get(ref)
                    bar.update()
        return {name: results[name] for name in jobs}  # in the jobs' order, whatever finished first

    def run_one(self, name: str, job: Job, desc: str) -> Any:
        return self.run({name: job}, desc)[name]
