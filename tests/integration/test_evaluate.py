"""Evaluation on real Ray + MLflow: metrics, reports, the sampler table, FID via an injected extractor, and the
promotion gate (first model promoted, untrained model rejected, better model promoted).

Models are trained in-process for a few dozen steps (``diffusion.training_losses``) and registered with
``log_and_register`` under their own registry name, so the shared session model and its aliases are untouched.
"""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.integration.conftest import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIRST_STEPS, BETTER_STEPS = 20, 150  # embedded FD on digits 8x8: untrained ~33, 20 steps ~8


class TinyInceptionShaped(nn.Module):
    """Stands in for InceptionV3 pool3: uint8 [B, 3, H, W] resized to 299x299 -> 2048 features (random init)."""

    name = "tiny-inception-shaped-test"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 16, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
        x = F.relu(self.conv(F.adaptive_avg_pool2d(x, 4)))
        return F.relu(self.fc(x.flatten(1)))


def _train(unet, diffusion, x, y, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        t = torch.randint(0, diffusion.num_timesteps, (32,), generator=g)
        loss = diffusion.training_losses(unet, x[idx], t, model_kwargs={"y": y[idx]})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    unet.eval()


@pytest.fixture(scope="module")
def gate_setup(ray_session, tiny_workspace, tiny_data):
    """Registers v1 = trained FIRST_STEPS, v2 = untrained, v3 = trained BETTER_STEPS (one run each)."""
    from pipelines.data import load_split_tensors
    from pipelines.model_io import build_diffusion, build_unet, log_and_register
    from pipelines.tracking import setup_mlflow
    from pipelines.train import model_card

    dummy = tiny_workspace / "not-really-inception.pth"
    dummy.write_bytes(b"0")
    cfg = tiny_config(tiny_workspace, f"registry.model_name=eval-gate-{tiny_workspace.name}",
                      "model.attention_resolutions=[]", "evaluate.sampler_table=[]", "evaluate.bpd_subset=0",
                      f"evaluate.inception_weights={dummy}")
    exp = setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores, Ray workers alongside: one thread trains fastest here
    try:
        x, y = load_split_tensors(tiny_data, "train")
        diffusion = build_diffusion(cfg.diffusion)
        versions = {}
        for key, seed in (("untrained", 1), ("first", 0)):
            torch.manual_seed(seed)
            unet = build_unet(cfg.model, image_size=tiny_data.image_size, channels=tiny_data.channels,
                              num_classes=tiny_data.num_classes, learn_sigma=cfg.diffusion.learn_sigma)
            steps = 0
            if key == "first":
                _train(unet, diffusion, x, y, FIRST_STEPS, seed)
                steps = FIRST_STEPS
            versions[key] = (unet, steps)
        unet, _ = versions["first"]
        states = {k: ({n: p.detach().clone() for n, p in u.state_dict().items()}, s, u.config)
                  for k, (u, s) in versions.items()}
        _train(unet, diffusion, x, y, BETTER_STEPS - FIRST_STEPS, 1)
        states["better"] = ({n: p.detach().clone() for n, p in unet.state_dict().items()}, BETTER_STEPS,
                            unet.config)
    finally:
        torch.set_num_threads(threads)
    registered = {}
    for key in ("first", "untrained", "better"):
        state, steps, unet_config = states[key]
        run_id = client.create_run(exp, run_name=f"eval-test-{key}").info.run_id
        card = model_card(cfg, tiny_data, unet_config, step=steps, run_id=run_id)
        registered[key] = log_and_register(state, card, run_id=run_id, model_name=cfg.registry.model_name)
        client.set_terminated(run_id)
    return cfg, registered


def _version_tags(cfg, version: str) -> dict[str, str]:
    return dict(mlflow.MlflowClient().get_model_version(cfg.registry.model_name, version).tags)


def _model_id(client, cfg, version: str) -> str:
    from pipelines.evaluate.gate import version_model_id

    return version_model_id(client.get_model_version(cfg.registry.model_name, version))


def _logged_model_metrics(client, cfg, version: str) -> dict[str, float]:
    """The newest value of each metric logged against the version's LoggedModel."""
    latest: dict[str, tuple[int, float]] = {}
    for m in client.get_logged_model(_model_id(client, cfg, version)).metrics:
        if m.key not in latest or m.timestamp >= latest[m.key][0]:
            latest[m.key] = (m.timestamp, m.value)
    return {k: v for k, (_, v) in latest.items()}


def test_gate_promotes_first_rejects_worse_promotes_better(gate_setup, tiny_data):
    from pipelines.evaluate import evaluate, promote

    cfg, reg = gate_setup
    client = mlflow.MlflowClient()
    name, alias = cfg.registry.model_name, cfg.registry.champion_alias
    results = {}
    for key in ("first", "untrained", "better"):
        ev = evaluate(cfg, reg[key].uri, tiny_data)
        results[key] = ev
        assert ev.model_version == reg[key].version
        assert all(math.isfinite(v) for v in ev.metrics.values())
        # FID: weights file set but the optional extra is absent -> skipped with a clear reason
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            assert "torch-fidelity is not installed" in ev.skipped["fid"] and "fid" not in ev.metrics
        dec = promote(cfg, name, reg[key].version, ev.metrics)
        results[key + "_dec"] = dec

    first, untrained, better = results["first_dec"], results["untrained_dec"], results["better_dec"]
    assert first.decision == "promoted" and first.champion_version is None
    assert untrained.decision == "rejected" and untrained.champion_version == reg["first"].version
    assert better.decision == "promoted" and better.champion_version == reg["first"].version
    assert str(client.get_model_version_by_alias(name, alias).version) == reg["better"].version

    fd = {k: results[k].metrics["frechet_distance"] for k in ("first", "untrained", "better")}
    assert fd["untrained"] > fd["first"] > fd["better"], fd
    # the metric separates noise from data: real-vs-real baseline far below an untrained model's samples
    base = results["untrained"].metrics["frechet_distance_real"]
    assert base < 0.5 * fd["untrained"], (base, fd)
    assert results["untrained"].metrics["class_accuracy"] < results["better"].metrics["class_accuracy"]

    tags = _version_tags(cfg, reg["untrained"].version)
    assert "does not beat" in tags["rejected"] and "frechet_distance" in tags["rejected"]
    assert untrained.value == pytest.approx(fd["untrained"]) and untrained.champion_value == pytest.approx(fd["first"])
    assert tags["decision"] == "rejected" and f"{fd['untrained']:.6g}" in tags["primary_metric"]
    assert tags["compared_with"].startswith(f"v{reg['first'].version} (frechet_distance = {fd['first']:.6g})")
    desc = client.get_model_version(name, reg["untrained"].version).description
    assert "rejected" in desc and f"{fd['untrained']:.6g}" in desc and f"{fd['first']:.6g}" in desc
    tags = _version_tags(cfg, reg["better"].version)
    assert tags["decision"] == "promoted" and "rejected" not in tags
    assert better.champion_value == pytest.approx(fd["first"])
    assert _version_tags(cfg, reg["first"].version)["superseded_by"] == reg["better"].version
    # the version keeps a few tags a human reads; the numbers live on its LoggedModel, under the run's names
    for key in ("first", "untrained", "better"):
        tags = _version_tags(cfg, reg[key].version)
        assert not any(k.startswith(("eval.", "promotion.")) for k in tags), tags
        assert len(tags) <= 6, tags
        logged = _logged_model_metrics(client, cfg, reg[key].version)
        assert logged == pytest.approx(results[key].metrics), key
        assert logged["frechet_distance"] == pytest.approx(fd[key])

    # the metrics were logged on a nested evaluate run under the model's run
    run = client.get_run(results["better"].run_id)
    assert run.data.tags["mlflow.parentRunId"] == reg["better"].run_id
    assert run.data.metrics["frechet_distance"] == pytest.approx(fd["better"])
    assert run.data.tags["eval.setup"].startswith("classifier=")
    # the evaluation run lists the model it measured and the held-out split it measured it on
    assert [i.model_id for i in run.inputs.model_inputs] == [_model_id(client, cfg, reg["better"].version)]
    (held_out,) = run.inputs.dataset_inputs
    ds = held_out.dataset
    assert {t.key: t.value for t in held_out.tags} == {"mlflow.data.context": "evaluation"}
    assert (ds.name, ds.digest) == (f"{tiny_data.source}-test", tiny_data.fingerprint)
    model = client.get_logged_model(_model_id(client, cfg, reg["better"].version))
    assert {(m.dataset_name, m.dataset_digest) for m in model.metrics} == {(ds.name, ds.digest)}

    # promoting the champion again is a no-op; a higher-is-better metric is compared the other way round
    assert promote(cfg, name, reg["better"].version, results["better"].metrics).decision == "already_champion"
    acc_cfg = cfg.model_copy(deep=True)
    acc_cfg.evaluate.primary_metric = "class_accuracy"
    acc = promote(acc_cfg, name, reg["untrained"].version, {"class_accuracy": 0.01})
    assert acc.decision == "rejected" and acc.higher_is_better and "higher is better" in acc.reason
    assert acc.champion_value == pytest.approx(results["better"].metrics["class_accuracy"])


def test_full_evaluation_report_table_bpd_fid(gate_setup, tiny_data):
    from pipelines.evaluate import evaluate

    cfg, reg = gate_setup
    full = tiny_config(cfg.workspace.root, f"registry.model_name={cfg.registry.model_name}",
                       "evaluate.bpd_subset=8")
    # raw (non-EMA) weights from a training checkpoint directory: here simply another model's weights
    from pipelines.model_io import load_model, save_weights

    ckpt = cfg.workspace.root / "raw-ckpt"
    ckpt.mkdir(exist_ok=True)
    save_weights(load_model(reg["first"].uri).unet.state_dict(), ckpt / "model.safetensors")
    ev = evaluate(full, reg["better"].uri, tiny_data, run_id=reg["better"].run_id, raw_weights=ckpt,
                  fid_extractor=TinyInceptionShaped)
    m = ev.metrics
    for k in ("frechet_distance", "frechet_distance_real", "frechet_ratio", "class_accuracy", "inception_score",
              "inception_score_real", "classifier_test_accuracy", "bpd", "fid", "seconds_per_image"):
        assert k in m and math.isfinite(m[k]), k
    assert 0 < m["bpd"] < 8 + 1 and m["bpd_num_images"] == 8
    assert 1.0 <= m["inception_score"] <= tiny_data.num_classes
    assert [(r.sampler, r.steps) for r in ev.sampler_table] == [("ddim", 10), ("dpm_solver", 10)]
    for r in ev.sampler_table:
        assert r.seconds_per_image > 0 and math.isfinite(r.frechet_distance) and r.num_samples == 64
    assert ev.reference["fid"]["fid_extractor"] == TinyInceptionShaped.name

    client = mlflow.MlflowClient()
    run = client.get_run(reg["better"].run_id)  # logged on the given run
    assert run.data.metrics["fid"] == pytest.approx(m["fid"])
    assert run.data.metrics["bpd"] == pytest.approx(m["bpd"])
    logged = _logged_model_metrics(client, cfg, reg["better"].version)  # the latest evaluation of the version
    assert logged["fid"] == pytest.approx(m["fid"]) and logged["bpd"] == pytest.approx(m["bpd"])
    names = {a.path for a in client.list_artifacts(reg["better"].run_id, "evaluate")}
    assert {"evaluate/report.json", "evaluate/report.md", "evaluate/sampler_table.json",
            "evaluate/sampler_table.md", "evaluate/samples"} <= names
    grids = {a.path for a in client.list_artifacts(reg["better"].run_id, "evaluate/samples")}
    assert grids == {f"evaluate/samples/{s}10_{w}.png" for s in ("ddim", "dpm_solver") for w in ("ema", "raw")}
    assert len(ev.grid_paths) == 4
    table = mlflow.artifacts.load_dict(f"runs:/{reg['better'].run_id}/evaluate/sampler_table.json")
    col = table["columns"].index("sampler")
    assert [row[col] for row in table["data"]] == ["ddim", "dpm_solver"]
    md = open(ev.report_md).read()
    assert "Sampler table" in md and "frechet_distance_real" in md


def _echo_after(name: str, spin: int) -> tuple[str, int]:
    total = 0
    for i in range(spin):  # busy work of different lengths, so jobs finish out of submission order
        total += i
    return name, total


def test_runner_returns_results_by_name(ray_session):
    from pipelines.config import EvaluateConfig
    from pipelines.evaluate.runner import TaskRunner

    runner = TaskRunner(EvaluateConfig(concurrency=3))
    spins = {"slow": 3_000_000, "quick": 1, "middle": 100_000, "last": 10}
    out = runner.run({k: (_echo_after, (k, n)) for k, n in spins.items()}, "test")
    assert list(out) == list(spins)  # the jobs' order, whatever finished first
    assert out == {k: (k, n * (n - 1) // 2) for k, n in spins.items()}
    assert runner.run_one("only", (_echo_after, ("only", 3)), "test") == ("only", 3)
