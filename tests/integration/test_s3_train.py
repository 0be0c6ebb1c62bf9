"""Ray Train on S3 (moto): 2 workers read their shards from the bucket, checkpoint to ``train.storage_path:
s3://...`` through pipelines.storage's filesystem, resume from there, and record each rank's Ray node id."""

from __future__ import annotations

import json

import mlflow
import pytest

from pipelines import storage
from pipelines.data import prepare_data
from pipelines.train import run_training
from tests.moto_s3 import s3_bucket_fixture  # noqa: F401 - the s3_bucket fixture

from .conftest import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_train_reads_s3_shards_checkpoints_to_s3_and_resumes(ray_session, tmp_path, s3_bucket):
    store, ckpts = f"{s3_bucket}/train-{tmp_path.name}", f"{s3_bucket}/ckpt-{tmp_path.name}"
    cfg = tiny_config(tmp_path, f"workspace.store={store}", f"train.storage_path={ckpts}", "train.max_steps=20",
                      "train.checkpoint_every=10", "train.sample_every=1000", "data.loader_workers=1")
    data = prepare_data(cfg, progress=False)
    assert all(u.startswith(f"{store}/data/") for u in data.train_urls)

    first = run_training(cfg, data, register=False)
    assert first.steps == 20
    objects = [name for name, _, _ in storage.list_files(ckpts)]
    kept = sorted({n.split("/")[1] for n in objects
                   if n.startswith(f"{cfg.train.run_name}/checkpoint_") and n.count("/") >= 2})
    assert len(kept) == cfg.train.num_to_keep  # checkpoints 10 and 20, as objects in the bucket
    assert all(f"{cfg.train.run_name}/{k}/model.safetensors" in objects for k in kept)
    assert not (tmp_path / "ray_results").exists()  # nothing went to local storage

    tags = mlflow.MlflowClient(cfg.tracking_uri).get_run(first.mlflow_run_id).data.tags
    node_ids = json.loads(tags["ray.node_ids"])
    alive = {n["NodeID"] for n in ray_session.nodes() if n["Alive"]}
    assert len(node_ids) == cfg.train.num_workers and set(node_ids) <= alive

    cfg.train.max_steps = 30  # same run_name: Ray Train restores the newest checkpoint from S3
    second = run_training(cfg, data, register=False)
    assert second.resumed_from_step == 20 and second.steps == 30
