"""Run records on a real (SQLite) MLflow store, without Ray: the dataset input, system metrics, the experiment's
kind tag."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest

from pipelines.data import DataResult
from tests.pipelines.conftest import sqlite_mlflow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    with sqlite_mlflow(root) as (cfg, exp):
        yield cfg, exp, root


def _data(root: Path) -> DataResult:
    d = root / "data" / "0123456789abcdef"
    train = [str(d / "train" / f"shard-{i:06d}.tar") for i in range(3)]
    return DataResult(source="digits", fingerprint="0123456789abcdef", manifest_path=d / "manifest.json",
                      data_dir=d, train_urls=train, test_urls=[str(d / "test" / "shard-000000.tar")],
                      num_train=300, num_test=97, num_classes=10, class_names=[str(i) for i in range(10)],
                      image_size=8, channels=1)


def test_experiment_is_tagged_custom_model_development(store):
    from pipelines.tracking import setup_mlflow

    cfg, exp, _ = store
    client = mlflow.MlflowClient()
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made before the tag existed gets it on the next set-up; a kind set by hand is kept
    old = cfg.model_copy(deep=True)
    old.registry.experiment_name = "made-before-the-tag"
    old_id = mlflow.create_experiment("made-before-the-tag")
    assert "mlflow.experimentKind" not in client.get_experiment(old_id).tags
    assert setup_mlflow(old) == old_id
    assert client.get_experiment(old_id).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(old_id, "mlflow.experimentKind", "genai_development")
    setup_mlflow(old)
    assert client.get_experiment(old_id).tags["mlflow.experimentKind"] == "genai_development"


def test_dataset_input_names_source_digest_and_counts(store):
    from pipelines.lineage import shard_dataset

    _, exp, root = store
    data = _data(root)
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_input(shard_dataset(data, "train"), context="training")
    inputs = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert (ds.name, ds.digest, tags["mlflow.data.context"]) == ("digits-train", data.fingerprint, "training")
    assert str(data.manifest_path) in ds.source
    profile = json.loads(ds.profile)
    assert profile["num_images"] == 300 and profile["num_shards"] == 3 and profile["shards"] == data.train_urls
    assert (profile["num_classes"], profile["image_size"], profile["channels"]) == (10, 8, 1)
    test = shard_dataset(data, "test")
    assert test.name == "digits-test" and test.profile["num_images"] == 97 and test.digest == data.fingerprint
    with pytest.raises(ValueError, match="'train' or 'test'"):
        shard_dataset(data, "validation")


def test_system_metrics_are_logged_until_finished(store):
    from pipelines.lineage import start_system_metrics

    _, exp, _ = store
    client = mlflow.MlflowClient()
    run_id = client.create_run(exp).info.run_id
    monitor = start_system_metrics(run_id, interval_s=0.05)
    deadline = time.monotonic() + 60  # a bound on waiting, not an assertion on time
    while time.monotonic() < deadline and not _system(client, run_id):
        time.sleep(0.05)
    monitor.finish()
    keys = _system(client, run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
    assert start_system_metrics(client.create_run(exp).info.run_id, enabled=False) is None


def _system(client, run_id: str) -> set[str]:
    return {k for k in client.get_run(run_id).data.metrics if k.startswith("system/")}
