"""Shared fixtures of tests/pipelines."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.config import PipelineConfig, load_config


@contextlib.contextmanager
def sqlite_mlflow(root: Path) -> Iterator[tuple[PipelineConfig, str]]:
    """A workspace at ``root`` with its real SQLite MLflow store set up: (config, experiment id)."""
    from pipelines.tracking import setup_mlflow

    with pytest.MonkeyPatch.context() as mp:
        # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which the config prefers to the workspace's SQLite
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = load_config(None, [f"workspace.root={root}"])
        yield cfg, setup_mlflow(cfg)
