"""Ray Train (2 DDP workers, gloo) + MLflow (SQLite) + the registry, for real, on the tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from diffusion_core.models import cpu_has_native_bf16
from pipelines.config import ConfigError, load_config
from pipelines.evaluate.gate import DECISION_TAGS
from pipelines.model_io import load_model
from pipelines.train import FaultInjection, TrainResult, check_before_start, register_trained, run_training

from .conftest import TINY, tiny_config

pytestmark = pytest.mark.integration


def _state(checkpoint_path: str) -> dict:
    return torch.load(Path(checkpoint_path) / "state.pt", weights_only=True)


def _loss_steps(checkpoint_path: str) -> list[int]:
    """The optimizer steps in the checkpoint's bounded loss summary (all of them for these short runs)."""
    losses = _state(checkpoint_path)["losses"]
    steps = [s for s, _ in losses["recent"]]
    assert losses["count"] == len(steps)
    return steps


def _ranks(checkpoint_path: str) -> list[dict]:
    return [json.loads((Path(checkpoint_path) / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_workers_train_track_and_register(trained_model, tiny_cfg):
    res = trained_model
    assert res.steps == tiny_cfg.train.max_steps and res.resumed_from_step is None
    ckpt = Path(res.checkpoint_path)
    ranks = [json.loads((ckpt / f"rank{r}.json").read_text()) for r in range(2)]
    # both ranks trained (consumed batches, computed finite local losses) on disjoint shards
    assert all(r["samples_seen"] == tiny_cfg.train.max_steps * tiny_cfg.train.batch_size for r in ranks)
    assert all(r["local_loss_mean"] > 0 for r in ranks)
    assert ranks[0]["shards"] and ranks[1]["shards"] and not set(ranks[0]["shards"]) & set(ranks[1]["shards"])

    mlflow.set_tracking_uri(tiny_cfg.tracking_uri)
    client = mlflow.MlflowClient()
    run = client.get_run(res.mlflow_run_id)
    assert run.data.params["train.num_workers"] == "2" and run.data.params["world_size"] == "2"
    assert run.data.params["torch_version"] == torch.__version__
    # train.mixed_precision=bf16 (the default) resolved by the core's per-device rule, logged with the fast defaults
    assert run.data.params["train.mixed_precision"] == "bf16"
    assert run.data.params["fast.train_autocast_dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    losses = [m.value for m in client.get_metric_history(res.mlflow_run_id, "loss")]
    assert len(losses) == tiny_cfg.train.max_steps // tiny_cfg.train.log_every
    assert losses[-1] < losses[0]  # the loss went down
    for key in ("images_per_sec", "lr", "grad_norm", "loss_q0", "loss_q3", "skipped_samples"):
        assert client.get_metric_history(res.mlflow_run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(res.mlflow_run_id, "samples")}
    assert f"samples/ema_step{res.steps:08d}.png" in artifacts
    assert "config.yaml" in {a.path for a in client.list_artifacts(res.mlflow_run_id)}

    mv = client.get_model_version(res.model_name, res.model_version)
    assert mv.run_id == res.mlflow_run_id
    assert mv.tags["idempotence_key"] == f"{res.mlflow_run_id}:{res.steps}"
    # no tag pile: what registration knows (run, data, steps) lives on the run; later only the gate's few tags
    assert set(mv.tags) <= {"idempotence_key", *DECISION_TAGS, "rejected", "superseded_by"}, mv.tags
    assert str(client.get_model_version_by_alias(res.model_name, "latest-trained").version) == res.model_version
    sampler = load_model(res.model_uri)
    x = sampler.sample(3, sampler="ddim", steps=5, seed=1)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    # the pyfunc face of the same model
    pyfunc = mlflow.pyfunc.load_model(res.model_uri)
    out = pyfunc.predict({"num_samples": [2], "seed": [3], "sampler": ["ddim"], "steps": [4]})
    assert len(out[0]["images"]) == 2 and out[0]["seed"] == 3


def test_killed_worker_resumes_from_checkpoint(ray_session, tiny_workspace, tiny_data):
    cfg = tiny_config(tiny_workspace, "train.run_name=killed", "train.max_failures=1", "train.max_steps=40",
                      "train.checkpoint_every=10", "train.sample_every=1000")
    # rank 1 dies right after step 21, before Train V2's controller (2 s poll) has registered checkpoint 20 as a
    # rule: the restarted ranks find it in the run's storage
    res = run_training(cfg, tiny_data, register=False,
                       faults=FaultInjection(kill_rank=1, kill_at_step=21, kill_delay_s=0.0))
    assert res.steps == 40 and res.resumed_from_step == 20
    history = _state(res.checkpoint_path)["losses"]["recent"]  # (step, loss) of every step here
    assert _loss_steps(res.checkpoint_path) == list(range(1, 41))  # every optimizer step exactly once
    ranks = _ranks(res.checkpoint_path)
    assert [r["start_step"] for r in ranks] == [20, 20]
    assert ranks[0]["start_noise"] != ranks[1]["start_noise"]  # after the resume each rank draws its own noise
    client = mlflow.MlflowClient(cfg.tracking_uri)
    logged = client.get_metric_history(res.mlflow_run_id, "loss")
    steps = [m.step for m in logged]
    # attempt 1 logged 5..20; attempt 2 resumed at 20 and logged 25..40: nothing is logged twice
    assert sorted(set(steps)) == list(range(5, 41, 5))
    assert all(steps.count(s) == 1 for s in (5, 10, 15, 20))
    by_step = {m.step: m.value for m in logged if m.step <= 20}
    # what attempt 1 logged before the crash is the history the resumed run carries on from
    assert by_step[20] == pytest.approx(sum(v for s, v in history if 16 <= s <= 20) / 5, rel=1e-6)


def test_second_call_with_same_run_name_resumes(trained_model, tiny_workspace, tiny_data):
    # the shared run ended at max_steps=40; the same run name with a larger budget continues it
    more = run_training(tiny_config(tiny_workspace, "train.max_steps=50", "train.sample_every=1000"), tiny_data)
    assert more.resumed_from_step == trained_model.steps == 40 and more.steps == 50
    assert more.mlflow_run_id == trained_model.mlflow_run_id  # one MLflow run for one training run
    assert int(more.model_version) == int(trained_model.model_version) + 1
    assert _loss_steps(more.checkpoint_path) == list(range(1, 51))


def test_torn_newest_checkpoint_falls_back_to_the_previous_one(ray_session, tiny_workspace, tiny_data):
    cfg = tiny_config(tiny_workspace, "train.run_name=torn", "train.max_steps=20", "train.checkpoint_every=10",
                      "train.sample_every=1000")
    first = run_training(cfg, tiny_data, register=False)
    newest = Path(first.checkpoint_path)
    assert newest.name == "checkpoint_00000020"
    for name in ("model.safetensors", "state.pt"):  # a crash or an interrupted upload
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])
    res = run_training(tiny_config(tiny_workspace, "train.run_name=torn", "train.max_steps=30",
                                   "train.checkpoint_every=10", "train.sample_every=1000"), tiny_data, register=False)
    assert res.resumed_from_step == 10 and res.steps == 30
    assert _loss_steps(res.checkpoint_path) == list(range(1, 31))  # exactly 30 optimizer steps, each once
    ranks = _ranks(res.checkpoint_path)
    assert [r["start_step"] for r in ranks] == [10, 10] and ranks[0]["start_noise"] != ranks[1]["start_noise"]
    kept = sorted(p.name for p in newest.parent.glob("checkpoint_0*") if p.is_dir())
    assert kept == ["checkpoint_00000020_1", "checkpoint_00000030"]  # the torn directory was not reused


_KILLED_REGISTRATION = """
import mlflow, sys
from pathlib import Path
from pipelines.config import load_config
from pipelines.train import FaultInjection, TrainResult, register_trained
cfg = load_config(None, sys.argv[1:-2])
mlflow.set_tracking_uri(cfg.tracking_uri)
out = TrainResult.model_validate_json(sys.argv[-2])
register_trained(cfg, out, Path(sys.argv[-1]), faults=FaultInjection(kill_after_version_created=True))
print("not killed")
"""


def test_registration_killed_between_steps_resumes_without_a_duplicate(trained_model, tiny_workspace, tmp_path):
    import shutil

    overrides = [*TINY, f"workspace.root={tiny_workspace}", "registry.model_name=killed-registration"]
    cfg = load_config(None, overrides)
    model_dir = tmp_path / "ema_model"
    shutil.copytree(Path(trained_model.checkpoint_path) / "ema_model", model_dir)
    client = mlflow.MlflowClient(cfg.tracking_uri)
    experiment = client.get_run(trained_model.mlflow_run_id).info.experiment_id
    run_id = client.create_run(experiment, run_name="killed-registration").info.run_id
    out = TrainResult(run_name="killed-registration", mlflow_run_id=run_id, checkpoint_path=str(tmp_path),
                      steps=trained_model.steps, final_loss=None, resumed_from_step=None,
                      data_fingerprint=trained_model.data_fingerprint)
    # the driver dies right after the registry created the version, before the alias moved
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_REGISTRATION, *overrides, out.model_dump_json(),
                           str(model_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "driver exits after creating version 1" in proc.stdout, proc.stderr[-3000:]
    assert "not killed" not in proc.stdout
    versions = client.search_model_versions("name='killed-registration'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].tags["idempotence_key"] == f"{run_id}:40"
    assert not client.get_registered_model("killed-registration").aliases

    mlflow.set_tracking_uri(cfg.tracking_uri)
    again = register_trained(cfg, out, model_dir)  # the resumed run registers the same (run, step)
    assert again.model_version == "1"
    assert [str(v.version) for v in client.search_model_versions("name='killed-registration'")] == ["1"]
    assert str(client.get_model_version_by_alias("killed-registration", "latest-trained").version) == "1"
    # a further step is a new key and a new version
    later = register_trained(cfg, out.model_copy(update={"steps": 41}), model_dir)
    assert later.model_version == "2"


def test_nonfinite_losses_stop_the_run_and_keep_the_checkpoint(ray_session, tiny_workspace, tiny_data):
    cfg = tiny_config(tiny_workspace, "train.run_name=nan", "train.max_steps=40", "train.checkpoint_every=5",
                      "train.max_nonfinite_steps=3", "train.sample_every=1000", "train.mixed_precision='no'")
    with pytest.raises(RuntimeError, match=r"3 consecutive non-finite losses at step 8"):
        run_training(cfg, tiny_data, faults=FaultInjection(nan_from_step=8, kill_delay_s=0))
    ckpts = sorted((cfg.workspace.ray_results / "nan").glob("checkpoint_0*"))
    assert ckpts and ckpts[-1].name == "checkpoint_00000005"
    assert _state(str(ckpts[-1]))["step"] == 5
    run = mlflow.MlflowClient(cfg.tracking_uri).search_runs(
        [mlflow.get_experiment_by_name(cfg.registry.experiment_name).experiment_id],
        "tags.ray_run_name = 'nan'")[0]
    assert run.info.status == "FAILED"
    assert run.data.params["fast.train_autocast_dtype"] == "float32"  # mixed_precision=no: fp32 on every device


@pytest.mark.parametrize(("override", "field"), [("train.num_workers=0", "train.num_workers"),
                                                 ("diffusion.noise_schedule=nope", "diffusion.noise_schedule")])
def test_config_errors_fail_before_ray_starts(tmp_path, override, field):
    import ray

    was = ray.is_initialized()
    with pytest.raises(ConfigError, match=field):
        tiny_config(tmp_path, override)
    assert ray.is_initialized() == was


def test_too_many_readers_for_the_shards(tiny_workspace, tiny_data):
    cfg = tiny_config(tiny_workspace, "train.num_workers=8", "data.loader_workers=4")
    with pytest.raises(ConfigError, match="train.num_workers"):
        check_before_start(cfg, tiny_data)
