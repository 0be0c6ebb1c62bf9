"""What a run records besides its own metrics: the data it read and the load of the machine it ran on.

- :func:`shard_dataset` describes one split of prepared shards as an MLflow dataset (``mlflow.log_input``): name
  ``<source>-<split>``, the data fingerprint as digest, the manifest (or shard directory) as source, and a profile
  with the counts, the image shape and the shard URIs. Training logs its train split (context ``training``),
  evaluation the held-out split its metrics were measured on (context ``evaluation``).
- :func:`start_system_metrics` samples CPU, memory, disk, network (and NVIDIA GPUs when ``nvidia-ml-py`` imports)
  into the run as ``system/...`` metrics until stopped (MLflow's own monitor, the one behind
  ``mlflow.start_run(log_system_metrics=True)``, started here for a run that another process owns).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from pipelines.data import DataResult

MAX_PROFILE_URLS = 64  # a profile lists at most this many shard URIs per split (and says how many there are)


class ShardDataset(MetaDataset):
    """A split of webdataset shards: no rows in memory, only where they are, their fingerprint and counts."""

    def __init__(self, data: DataResult, split: str):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        urls = data.train_urls if split == "train" else data.test_urls
        where = data.manifest_path or data.data_dir or (urls[0] if urls else data.source)
        self._profile: dict[str, Any] = {
            "split": split, "num_images": data.num_train if split == "train" else data.num_test,
            "num_shards": len(urls), "shards": urls[:MAX_PROFILE_URLS], "num_classes": data.num_classes,
            "class_names": data.class_names, "image_size": data.image_size, "channels": data.channels,
            "fingerprint": data.fingerprint, "manifest": str(data.manifest_path) if data.manifest_path else None,
        }
        super().__init__(source=dataset_source(str(where)), name=f"{data.source}-{split}", digest=data.fingerprint)

    @property
    def profile(self) -> dict[str, Any]:
        """Counts (``num_images``, ``num_shards``), shape, classes and the shard URIs of the split."""
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def dataset_source(where: str) -> DatasetSource:
    """The MLflow dataset source of a path or URI (``file://``, ``s3://``, ``gs://``, ``https://``, ...).

    MLflow registers its local-file source twice (for ``""`` and ``file``), and resolving a local URI among all
    sources warns that it is ambiguous; one candidate per source type resolves it without the warning.
    """
    uri = where if "://" in where else Path(where).resolve().as_uri()
    candidates: dict[str, type[DatasetSource]] = {}
    for src in get_registered_sources():
        candidates.setdefault(src._get_source_type(), src)
    return resolve_dataset_source(uri, candidate_sources=list(candidates.values()))


def shard_dataset(data: DataResult, split: str = "train") -> ShardDataset:
    """The MLflow dataset of one split (``train`` or ``test``) of ``data``."""
    return ShardDataset(data, split)


def start_system_metrics(run_id: str, *, enabled: bool = True, interval_s: float = 10.0, node: str | None = None,
                         tracking_uri: str | None = None):
    """Start logging MLflow system metrics into ``run_id`` every ``interval_s`` seconds; returns the monitor (call
    ``finish()`` to stop and flush), or None when not ``enabled``.

    The monitor (a daemon thread) also stops by itself once the run is no longer RUNNING. ``node`` names the process
    in the keys (``system/<node>/cpu_utilization_percentage``); logging resumes at the run's next ``system/`` step,
    so a restarted worker continues the series.
    """
    if not enabled:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                   resume_logging=True, node_id=node, tracking_uri=tracking_uri)
    monitor.start()
    return monitor
