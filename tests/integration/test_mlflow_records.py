"""What the MLflow UI shows for the shared tiny training run (real Ray Train, real SQLite MLflow): the experiment's
kind, the dataset the run trained on, system metrics sampled during training, and the EMA sample-grid series."""

from __future__ import annotations

import json

import mlflow
import pytest
from PIL import Image

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def train_run(trained_model):
    return mlflow.MlflowClient().get_run(trained_model.mlflow_run_id)


def test_experiment_opens_on_training_runs(train_run):
    exp = mlflow.MlflowClient().get_experiment(train_run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_training_run_records_its_dataset(train_run, tiny_data):
    inputs = [i for i in train_run.inputs.dataset_inputs
              if {t.key: t.value for t in i.tags}.get("mlflow.data.context") == "training"]
    assert len(inputs) == 1, train_run.inputs.dataset_inputs
    ds = inputs[0].dataset
    assert (ds.name, ds.digest) == (f"{tiny_data.source}-train", tiny_data.fingerprint)
    assert str(tiny_data.manifest_path) in ds.source
    profile = json.loads(ds.profile)
    assert profile["num_images"] == tiny_data.num_train and profile["shards"] == tiny_data.train_urls
    assert profile["num_shards"] == len(tiny_data.train_urls)


def test_system_metrics_are_sampled_during_training(train_run, tiny_cfg):
    assert tiny_cfg.train.system_metrics
    client = mlflow.MlflowClient()
    cpu = client.get_metric_history(train_run.info.run_id, "system/cpu_utilization_percentage")
    assert cpu and all(0 <= m.value <= 100 * 64 for m in cpu)
    assert "system/system_memory_usage_megabytes" in train_run.data.metrics
    assert train_run.data.metrics["system/system_memory_usage_megabytes"] > 0


def test_ema_sample_grids_are_one_image_series_over_steps(train_run, tiny_cfg):
    """``log_image(key=..., step=...)``: MLflow's image viewer shows the grids with a step slider."""
    client = mlflow.MlflowClient()
    files = [a.path for a in client.list_artifacts(train_run.info.run_id, "images")]
    # MLflow names them images/<key>+step+<step>+timestamp+<ms>+<uuid>.png (plus a +compressed.webp thumbnail)
    grids = [p for p in files if p.startswith("images/ema_samples+step+") and p.endswith(".png")]
    steps = sorted(int(p.split("+")[2]) for p in grids)
    tc = tiny_cfg.train
    expected = {*range(tc.sample_every, tc.max_steps + 1, tc.sample_every), tc.max_steps}  # 20, 40
    # (a test that resumes the shared run for more steps may add later ones)
    assert len(steps) == len(set(steps)) and expected <= set(steps), steps
    # readable: 4 x 4 tiles of 8 px upscaled (nearest neighbour) to at least 256 px wide
    local = mlflow.artifacts.download_artifacts(run_id=train_run.info.run_id, artifact_path=grids[0])
    with Image.open(local) as im:
        assert im.width >= 256 and im.width == im.height


def test_registered_model_carries_its_final_training_metrics(trained_model, train_run):
    """Logged at the final step, the LoggedModel gets the run's metrics of that step (and none of step 0)."""
    from pipelines.evaluate.gate import version_model_id

    client = mlflow.MlflowClient()
    mv = client.get_model_version(trained_model.model_name, trained_model.model_version)
    model = client.get_logged_model(version_model_id(mv))
    training = {m.key: m for m in model.metrics if m.run_id == train_run.info.run_id and m.dataset_name is None}
    assert {"loss", "lr", "grad_norm"} <= set(training), training
    assert all(m.step == trained_model.steps for m in training.values()), training
    history = client.get_metric_history(train_run.info.run_id, "loss")
    assert training["loss"].value == pytest.approx([m.value for m in history if m.step == trained_model.steps][0])
