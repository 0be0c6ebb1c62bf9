"""The registered-model format, free of pydantic/Ray so that it ships inside the MLflow model.

A model directory holds ``weights.safetensors`` (UNet weights) and ``config.json``::

    {"format_version": 2, "unet": UNet config, "diffusion": the DiffusionConfig fields,
     "data": image size, channels, classes, normalisation, fingerprint, "training": steps, run id, ...}

``pipelines.model_io`` (the pipeline's loader, with config validation) and ``pipelines.mlflow_model`` (the
pyfunc face, loaded by ``mlflow.pyfunc`` in a fresh environment) both read it through this module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusion_core import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)

FORMAT_VERSION = 2  # 2: config.json's "diffusion" holds the DiffusionConfig fields (1 held create_diffusion kwargs)
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"

# Config spellings stay as users write them; the core's enums are the vocabulary, and this table is the only
# place that translates one into the other.
PREDICTION = {"epsilon": ModelMeanType.EPSILON, "x0": ModelMeanType.START_X, "v": ModelMeanType.VELOCITY}


def diffusion_from_fields(d: Mapping[str, Any]) -> GaussianDiffusion:
    """The diffusion the DiffusionConfig fields ``d`` describe: betas of ``noise_schedule`` over
    ``diffusion_steps``, the prediction target, the variance (LEARNED_RANGE, or FIXED_SMALL / FIXED_LARGE), the
    loss (RESCALED_KL, RESCALED_MSE or MSE, as DiT's ``create_diffusion``) and the optional min-SNR-gamma
    weighting. Missing fields take DiffusionConfig's defaults."""
    learn_sigma, sigma_small = bool(d.get("learn_sigma", False)), bool(d.get("sigma_small", False))
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    if d.get("use_kl", False):
        loss_type = LossType.RESCALED_KL
    else:
        loss_type = LossType.RESCALED_MSE if d.get("rescale_learned_sigmas", False) else LossType.MSE
    betas = get_named_beta_schedule(d.get("noise_schedule", "linear"), int(d.get("diffusion_steps", 1000)))
    return GaussianDiffusion(betas=betas, model_mean_type=PREDICTION[d.get("predict", "epsilon")],
                             model_var_type=var_type, loss_type=loss_type, snr_gamma=d.get("min_snr_gamma"))


def upgrade_card(card: dict[str, Any]) -> dict[str, Any]:
    """A format-1 config.json (``create_diffusion`` keyword arguments) in format 2 (DiffusionConfig fields)."""
    if card.get("format_version") != 1:
        return card
    k = card["diffusion"]
    predict = "x0" if k.get("predict_xstart") else "v" if k.get("predict_v") else "epsilon"
    fields = ("noise_schedule", "diffusion_steps", "learn_sigma", "sigma_small", "use_kl", "rescale_learned_sigmas")
    diffusion = {**{f: k[f] for f in fields if f in k}, "predict": predict}
    diffusion["sigma_small"] = diffusion.get("sigma_small", False) and not diffusion.get("learn_sigma", False)
    return {**card, "format_version": FORMAT_VERSION, "diffusion": diffusion}


def read_card(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a model directory, upgraded to the current format; ValueError for an unknown one."""
    path = Path(directory) / CONFIG
    card = upgrade_card(json.loads(path.read_text()))
    if card.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {card.get('format_version')} is not one this code reads "
                         f"(1 or {FORMAT_VERSION})")
    return card
