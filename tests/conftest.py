"""Suite-wide fixtures: one session-scoped local Ray (small, no dashboard), shut down at the end."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests always use their own SQLite workspace
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 4 logical CPUs (2 DDP workers + tasks + a Serve replica fit on 2 cores)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
                 log_to_driver=True, configure_logging=False)
    yield ray
    if started:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
