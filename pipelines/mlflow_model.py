"""The registered model as an MLflow 3 pyfunc logged from code (no pickle), loadable in a fresh virtualenv.

``log_pyfunc_model`` logs ``pipelines/mlflow_model_entry.py`` (which calls ``mlflow.models.set_model``) with

- artifacts ``weights.safetensors`` and ``config.json`` (the model card, as ``pipelines.model_io`` writes them),
- ``code_paths``: ``diffusion_core`` and a ``pipelines`` package holding only this module and ``images.py``,
- pinned requirements of the versions in use (mlflow-skinny, torch, safetensors, numpy, pandas, pillow),
- a full signature (inputs and outputs) and a one-row input example.

This module is the loading path inside the model, so it imports only torch, safetensors, numpy, pandas, PIL,
mlflow and diffusion_core: no Ray, webdataset, pydantic or the rest of ``pipelines``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from safetensors.torch import load_file, save_file

from diffusion_core import guidance
from diffusion_core.models import UNet
from diffusion_core.samplers import sample as core_sample
from pipelines.model_format import CONFIG, FORMAT_VERSION, WEIGHTS, diffusion_from_fields, read_card

ENTRY = Path(__file__).with_name("mlflow_model_entry.py")
# What the model needs at load and predict time; pinned to the installed versions (torch without a local
# "+cpu" tag: torch==X.Y.Z resolves to the right build on each machine). Not diffusion-pipeline: not on PyPI.
REQUIREMENTS = ("mlflow-skinny", "torch", "safetensors", "numpy", "pandas", "pillow")

SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec(DataType.long, "num_samples"),
        ColSpec(DataType.long, "seed", required=False),
        ColSpec(DataType.string, "sampler", required=False),
        ColSpec(DataType.long, "steps", required=False),
        ColSpec(DataType.double, "eta", required=False),
        ColSpec(DataType.double, "guidance_scale", required=False),
        ColSpec(DataType.long, "class_label", required=False),
    ]),
    outputs=Schema([ColSpec(DataType.long, "seed"), ColSpec(Array(DataType.string), "images")]),
)


def pinned_requirements() -> list[str]:
    """``name==version`` of each of :data:`REQUIREMENTS` as installed here (local version tags dropped)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def input_example(card: Mapping[str, Any]) -> dict[str, list]:
    """A one-row request that is cheap to run (1 image, 2 DDIM steps; class 0 for a class-conditional model)."""
    steps = min(2, int(card["diffusion"]["diffusion_steps"]))
    row = {"num_samples": [1], "seed": [0], "sampler": ["ddim"], "steps": [steps]}
    if card["unet"].get("num_classes"):
        row["class_label"] = [0]
    return row


# ---------------------------------------------------------------------------------------------- loading
class PyfuncSampler:
    """The UNet and its diffusion from a model directory; draws images in [-1, 1], [B, C, H, W]."""

    def __init__(self, directory: str | Path, device: str | torch.device | None = None) -> None:
        d = Path(directory)
        card = read_card(d)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.card = card
        self.unet = UNet.from_config(card["unet"])
        self.unet.load_state_dict(load_file(str(d / WEIGHTS)))
        self.unet.eval().to(self.device)
        self.diffusion = diffusion_from_fields(card["diffusion"])
        self.num_classes = int(card["unet"].get("num_classes") or 0)
        size = int(card["data"]["image_size"])
        self.shape = (int(card["data"]["channels"]), size, size)

    @torch.no_grad()
    def sample(self, num_samples: int, *, seed: int, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
               guidance_scale: float = 1.0, class_label: int | None = None) -> torch.Tensor:
        """One request: labels ``class_label`` for all rows, or 0..K-1 cycled; noise from one generator seeded
        ``seed`` shared by the rows in order (as ``pipelines.model_io.DiffusionSampler.sample(seed=...)``)."""
        labels = guidance.class_labels(num_samples, self.num_classes, None if class_label is None else [class_label])
        model, kwargs = guidance.conditioned_model(self.unet, None if labels is None else labels.to(self.device),
                                                   guidance_scale, null_label=self.num_classes,
                                                   eps_channels=self.shape[0])
        g = torch.Generator().manual_seed(int(seed))
        return core_sample(self.diffusion, model, (num_samples, *self.shape), sampler=sampler, steps=steps,
                           eta=eta, generator=[g] * num_samples, model_kwargs=kwargs, device=self.device)


def _value(row: Mapping[str, Any], key: str, default: Any) -> Any:
    v = row.get(key)
    return default if v is None or v != v else v  # absent, None or NaN (pandas' missing value)


class DiffusionPyfunc(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc`` face of the registered model: each input row is one sampling request.

    Columns as in :data:`SIGNATURE`; missing ones default to seed random, ddim, 50 steps, eta 0, guidance 1,
    classes cycled. Output: one record per row, ``seed`` (the one used) and ``images`` (base64 PNG strings).
    """

    def load_context(self, context) -> None:
        self.sampler = PyfuncSampler(Path(context.artifacts["config"]).parent)

    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        from pipelines.images import to_png_b64

        out = []
        for row in pd.DataFrame(model_input).to_dict("records"):
            seed = int(_value(row, "seed", torch.randint(0, 2**31 - 1, ()).item()))
            label = _value(row, "class_label", None)
            x = self.sampler.sample(int(_value(row, "num_samples", 1)), seed=seed,
                                    sampler=str(_value(row, "sampler", "ddim")),
                                    steps=int(_value(row, "steps", 50)), eta=float(_value(row, "eta", 0.0)),
                                    guidance_scale=float(_value(row, "guidance_scale", 1.0)),
                                    class_label=None if label is None else int(label))
            out.append({"seed": seed, "images": to_png_b64(x)})
        return out


# ---------------------------------------------------------------------------------------------- logging
def _stage_code(tmp: Path) -> list[str]:
    """``code_paths``: diffusion_core, and a ``pipelines`` package with only this module, model_format.py and images.py."""
    here = Path(__file__).resolve().parent
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    core = shutil.copytree(here.parent / "diffusion_core", tmp / "diffusion_core", ignore=ignore)
    pkg = tmp / "pipelines"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""The loader shipped inside a registered diffusion model."""\n')
    for name in ("mlflow_model.py", "model_format.py", "images.py"):
        shutil.copy2(here / name, pkg / name)
    return [str(core), str(pkg)]


def log_pyfunc_model(weights: str | Path | Mapping[str, torch.Tensor], card: Mapping[str, Any] | None = None, *,
                     name: str = "model", **log_model_kwargs: Any) -> mlflow.models.model.ModelInfo:
    """Log the model from code into the active run (``mlflow.pyfunc.log_model``); returns its ModelInfo.

    ``weights`` is a directory holding ``weights.safetensors`` and ``config.json`` (then ``card`` is None), or a
    UNet state dict, written with ``card`` (the model card without ``format_version``). Further keyword arguments
    (``registered_model_name``, ``step``, ``tags``, ``model_id``, ...) go to ``mlflow.pyfunc.log_model``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if isinstance(weights, str | Path):
            if card is not None:
                raise ValueError("pass card only with a state dict: a model directory has its own config.json")
            src = Path(weights)
        else:
            if card is None:
                raise ValueError("a state dict needs its card (config.json content)")
            src = tmp / "artifacts"
            src.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(src / WEIGHTS))
            doc = {"format_version": FORMAT_VERSION, **card}
            (src / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True))
        card_read = json.loads((src / CONFIG).read_text())
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(ENTRY),
            artifacts={"weights": str(src / WEIGHTS), "config": str(src / CONFIG)},
            code_paths=_stage_code(tmp),
            signature=SIGNATURE,
            input_example=input_example(card_read),
            pip_requirements=pinned_requirements(),
            **log_model_kwargs,
        )
