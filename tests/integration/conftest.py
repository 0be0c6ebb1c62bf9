"""Integration fixtures: a tiny config in a temporary workspace, its shards, and one trained, registered model
shared by the train / evaluate / serve / DAG tests (one ``fit()`` costs ~10 s of fixed overhead)."""

from __future__ import annotations

import pytest

from pipelines.config import PipelineConfig, load_config

TINY = [
    "data.image_size=8",
    "data.samples_per_shard=128",
    "data.loader_workers=0",
    "data.shuffle_buffer=200",
    "model.preset=custom",
    "model.model_channels=32",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[4]",
    "diffusion.diffusion_steps=100",
    "train.num_workers=2",
    "train.batch_size=32",
    "train.max_steps=40",
    "train.lr=2e-3",
    "train.warmup_steps=5",
    "train.log_every=5",
    "train.ema_decays=[0.9]",  # 40 steps: a slow EMA would register nearly untrained weights
    "train.checkpoint_every=20",
    "train.sample_every=20",  # two grids: the ema_samples image series has steps 20 and 40
    "train.system_metrics_interval_s=1",  # a 40-step run still gets several system-metric samples
    "train.max_failures=0",
    "train.timeout_s=120",
    "evaluate.num_samples=64",
    "evaluate.bpd_subset=16",
    "evaluate.classifier_steps=150",
    "evaluate.sampler.sampler=ddim",
    "evaluate.sampler.steps=10",
    "evaluate.sampler_table=[{sampler: ddim, steps: 10}, {sampler: dpm_solver, steps: 10}]",
]


def tiny_config(workspace, *extra: str) -> PipelineConfig:
    """The tiny test configuration rooted at ``workspace``."""
    return load_config(None, [*TINY, f"workspace.root={workspace}", f"registry.model_name=tiny-{workspace.name}",
                              *extra])


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("ws")


@pytest.fixture(scope="session")
def tiny_cfg(tiny_workspace) -> PipelineConfig:
    return tiny_config(tiny_workspace)


@pytest.fixture(scope="session")
def tiny_data(tiny_cfg):
    from pipelines.data import prepare_data

    return prepare_data(tiny_cfg, progress=False)


@pytest.fixture(scope="session")
def trained_model(ray_session, tiny_cfg, tiny_data):
    """One 2-worker Ray Train run on the tiny config, registered in the workspace's MLflow registry."""
    from pipelines.train import run_training

    return run_training(tiny_cfg, tiny_data)
