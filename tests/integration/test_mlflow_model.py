"""The registered model logged from code (pipelines.mlflow_model) on a real MLflow (SQLite in a temporary dir).

The model is a tiny untrained class-conditional UNet: the tests check the format, the loading path and that the
pyfunc draws the same images as the pipeline's own loader (pipelines.model_io), not the quality of the art.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

T = 100
NAME = "pyfunc-tiny"


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)


def tiny_card_and_state():
    import torch

    from diffusion_core.models import UNet
    from pipelines.config import load_config
    from pipelines.model_io import diffusion_card

    torch.manual_seed(0)
    unet = UNet(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_classes=10, image_size=8, norm_groups=8, class_dropout_prob=0.1)
    diffusion = diffusion_card(load_config(None, [f"diffusion.diffusion_steps={T}"]).diffusion)
    card = {"unet": unet.config, "diffusion": diffusion,
            "data": {"image_size": 8, "channels": 1, "num_classes": 10}, "training": {"steps": 0}}
    return card, unet.state_dict()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Log + register the tiny model once, recording every warning (Python and MLflow's logger) while logging."""
    import mlflow

    from pipelines.mlflow_model import log_pyfunc_model

    tmp = tmp_path_factory.mktemp("pyfunc")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    exp = mlflow.create_experiment("pyfunc", artifact_location=(tmp / "artifacts").as_uri())  # store is up
    card, state = tiny_card_and_state()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("mlflow").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, mlflow.start_run(experiment_id=exp) as run:
            warnings.simplefilter("always")
            info = log_pyfunc_model(state, card, name="model", registered_model_name=NAME)
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp / "download")))
    yield {"info": info, "local": local, "card": card, "run_id": run.info.run_id, "tmp": tmp,
           "warnings": [f"{w.category.__name__}: {w.message}" for w in caught] + [r.getMessage() for r in records]}
    mlflow.set_tracking_uri(previous)


def test_logging_is_free_of_warnings(logged):
    assert logged["warnings"] == []


def test_model_is_logged_from_code_without_pickles(logged):
    local = logged["local"]
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert {"artifacts/weights.safetensors", "artifacts/config.json", "mlflow_model_entry.py",
            "code/pipelines/mlflow_model.py", "code/pipelines/images.py", "code/diffusion_core/samplers.py",
            "input_example.json", "requirements.txt"} <= set(files)
    # Only what loading needs is shipped: no other pipelines module (config, model_io, serve, ...).
    assert sorted(f for f in files if f.startswith("code/pipelines/")) == [
        "code/pipelines/__init__.py", "code/pipelines/images.py", "code/pipelines/mlflow_model.py",
        "code/pipelines/model_format.py"]
    flavor = __import__("yaml").safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor and flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "mlflow_model_entry.py"


def test_signature_has_inputs_and_outputs_and_the_example_fits(logged):
    import mlflow

    model = mlflow.models.Model.load(str(logged["local"]))
    assert model.signature.outputs is not None
    assert model.signature.inputs.input_names()[0] == "num_samples"
    assert model.signature.outputs.input_names() == ["seed", "images"]
    example = model.load_input_example(str(logged["local"]))
    assert example is not None and {"num_samples", "steps", "class_label"} <= set(example)


def test_requirements_are_pinned_and_installable(logged):
    from importlib.metadata import version

    reqs = (logged["local"] / "requirements.txt").read_text().split()
    names = {r.split("==")[0] for r in reqs}
    assert all("==" in r for r in reqs) and "diffusion-pipeline" not in names
    assert {"mlflow-skinny", "torch", "safetensors", "numpy", "pandas", "pillow"} <= names
    # torch pinned exactly X.Y.Z (a "+cpu" local tag would not resolve on a GPU machine, nor from PyPI)
    assert f"torch=={version('torch').split('+')[0]}" in reqs


def test_format_matches_the_pipeline_loader():
    from pipelines import mlflow_model, model_io

    assert (mlflow_model.FORMAT_VERSION, mlflow_model.WEIGHTS, mlflow_model.CONFIG) == (
        model_io.FORMAT_VERSION, model_io.WEIGHTS, model_io.CONFIG)


REQUESTS = [
    {"num_samples": [2], "seed": [3], "sampler": ["ddim"], "steps": [4]},
    {"num_samples": [3], "seed": [9], "sampler": ["ddpm"], "steps": [5], "class_label": [4], "guidance_scale": [2.0]},
    {"num_samples": [1], "seed": [1], "sampler": ["dpm_solver"], "steps": [3], "class_label": [7]},
]


def reference_images(uri: str, req: dict) -> list[np.ndarray]:
    """Oracle: the same request through pipelines.model_io's own loader and sampler."""
    from pipelines.images import to_png_b64
    from pipelines.model_io import load_model

    s = load_model(uri)
    label = req.get("class_label")
    x = s.sample(req["num_samples"][0], sampler=req["sampler"][0], steps=req["steps"][0],
                 guidance_scale=req.get("guidance_scale", [1.0])[0], class_labels=label, seed=req["seed"][0])
    return [decode(b) for b in to_png_b64(x)]


@pytest.mark.parametrize("req", REQUESTS, ids=[r["sampler"][0] for r in REQUESTS])
def test_pyfunc_draws_what_the_pipeline_loader_draws(logged, req):
    import mlflow

    uri = f"models:/{NAME}/1"
    out = mlflow.pyfunc.load_model(uri).predict(req)
    assert len(out) == 1 and out[0]["seed"] == req["seed"][0]
    got = [decode(b) for b in out[0]["images"]]
    ref = reference_images(uri, req)
    assert len(got) == len(ref) == req["num_samples"][0] and got[0].shape == (8, 8)
    assert max(np.abs(a - b).max() for a, b in zip(got, ref, strict=True)) <= 1


def test_logging_from_a_model_directory(logged, tmp_path):
    import mlflow

    from pipelines.mlflow_model import log_pyfunc_model
    from pipelines.model_io import write_model_dir

    card, state = tiny_card_and_state()
    d = write_model_dir(tmp_path / "m", state, card)
    with mlflow.start_run(run_id=logged["run_id"]):
        info = log_pyfunc_model(d, name="from_dir")
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
    logged_card = json.loads((local / "artifacts" / "config.json").read_text())
    assert logged_card == json.loads((d / "config.json").read_text())
    with pytest.raises(ValueError, match="card"):
        log_pyfunc_model(d, card)


LOAD_AND_PREDICT = """
import json, sys
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(json.loads(sys.argv[2]))
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("pipelines", "diffusion_core"))
foreign = sorted(m for m in ("ray", "webdataset", "pipelines.config", "pipelines.model_io") if m in sys.modules)
print(json.dumps({"out": out, "pipelines": [m for m in ours if m.startswith("pipelines")], "foreign": foreign,
                  "file": sys.modules["pipelines.mlflow_model"].__file__}))
"""


def run_load_and_predict(python: str, model_dir: Path, req: dict, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    proc = subprocess.run([python, "-c", LOAD_AND_PREDICT, str(model_dir), json.dumps(req)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr and "Warning:" not in proc.stderr, proc.stderr[-4000:]  # no load warning
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loading_imports_only_the_shipped_code(logged, tmp_path):
    """In a clean interpreter (no PYTHONPATH), loading runs the model's own copy of the loader, and nothing
    of Ray, webdataset, the pipeline config or model_io."""
    res = run_load_and_predict(sys.executable, logged["local"], REQUESTS[0], tmp_path)
    assert res["foreign"] == [] and res["file"].startswith(str(logged["local"] / "code"))
    assert res["pipelines"] == ["pipelines", "pipelines.images", "pipelines.mlflow_model", "pipelines.model_format"]
    assert len(res["out"][0]["images"]) == 2


@pytest.mark.slow
def test_loads_in_a_fresh_virtualenv_from_its_own_requirements(logged, tmp_path):
    """``python -m venv`` + ``pip install -r requirements.txt`` of the model, then load and predict there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    # --no-compile: byte-compiling every installed module (torch, mlflow) is a large part of pip's time; the
    # modules the model imports are compiled when imported
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check", "-r",
                          str(logged["local"] / "requirements.txt")],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-4000:]
    req = REQUESTS[1]
    res = run_load_and_predict(py, logged["local"], req, tmp_path)
    assert res["foreign"] == []
    assert res["pipelines"] == ["pipelines", "pipelines.images", "pipelines.mlflow_model", "pipelines.model_format"]
    got = [decode(b) for b in res["out"][0]["images"]]
    ref = reference_images(f"models:/{NAME}/1", req)
    assert max(np.abs(a - b).max() for a, b in zip(got, ref, strict=True)) <= 1
