"""The one registered-model format and its one loader.

A registered model is an MLflow pyfunc model logged from code (``pipelines.mlflow_model``) whose artifacts are

- ``weights.safetensors``: the (EMA) UNet weights,
- ``config.json``: ``{"format_version", "unet": UNet config, "diffusion": the DiffusionConfig fields,
  "data": image size, channels, classes, normalisation, fingerprint, "training": steps, run id, ...}``.

``load_model(uri)`` turns any model URI (``models:/name@alias``, ``models:/name/3``, ``runs:/id/model`` or a local
directory) into a ready :class:`DiffusionSampler`; evaluate, serve, the CLI and ``mlflow.pyfunc`` all go through it.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from safetensors.torch import load_file, save_file

from diffusion_core import GaussianDiffusion, ScheduleSampler, create_named_schedule_sampler, guidance
from diffusion_core.models import UNet
from diffusion_core.samplers import sample as core_sample
from diffusion_core.samplers import sample_progressive as core_sample_progressive
from pipelines.config import ConfigError, DiffusionConfig, ModelConfig
from pipelines.mlflow_model import log_pyfunc_model
from pipelines.model_format import (
    CONFIG,
    FORMAT_VERSION,
    WEIGHTS,
    diffusion_from_fields,
    read_card,
)

MODEL_NAME_IN_RUN = "model"

# ----------------------------------------------------------------------------------------------------------
# The one adapter from config to core. Config spellings stay as users write them; the core's enums are the
# vocabulary, and these tables are the only place that translates one into the other.

ARCH_FIELDS = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
               "head_channels", "use_scale_shift_norm", "resblock_updown")


def build_diffusion(d: DiffusionConfig) -> GaussianDiffusion:
    """The diffusion a config section describes: betas of ``noise_schedule`` over ``diffusion_steps``, the
    prediction target, the variance (LEARNED_RANGE, or FIXED_SMALL / FIXED_LARGE), the loss (RESCALED_KL,
    RESCALED_MSE or MSE, as DiT's ``create_diffusion``) and the optional min-SNR-gamma weighting."""
    return diffusion_from_fields(d.model_dump())


def build_timestep_sampler(d: DiffusionConfig, diffusion: GaussianDiffusion) -> ScheduleSampler:
    """The training-time distribution of t (``diffusion.timestep_sampler``) for ``diffusion``."""
    return create_named_schedule_sampler(d.timestep_sampler, diffusion)


def preset_architecture(preset: str, *, image_size: int, channels: int, num_classes: int | None) -> dict[str, Any]:
    """The full UNet config of a preset ('custom' starts from 'quickstart'), built on the meta device (no memory,
    no initialisation)."""
    with torch.device("meta"):
        if preset == "ddpm_cifar10":
            return UNet.ddpm_cifar10().config  # also its diffusers-compatible norm eps, padding, embedding flags
        return UNet.quickstart(image_size=image_size, in_channels=channels, num_classes=num_classes).config


def unet_config(model: ModelConfig, *, image_size: int, channels: int, num_classes: int,
                learn_sigma: bool) -> dict[str, Any]:
    """``UNet`` keyword arguments for a model section and the data's shape.

    A preset fixes the architecture fields: one set to a different value raises ConfigError naming it. Under
    'custom' every architecture field that is set replaces the quickstart value. dropout, label dropout,
    checkpointing and memory format always come from the model section."""
    classes = num_classes if (model.class_conditional and num_classes > 0) else None
    arch = preset_architecture(model.preset, image_size=image_size, channels=channels, num_classes=classes)
    chosen = {k: getattr(model, k) for k in ARCH_FIELDS if getattr(model, k) is not None}
    if model.preset != "custom":
        bad = {k: v for k, v in chosen.items() if v != arch[k]}
        if bad:
            raise ConfigError("; ".join(f"model.{k}={v!r} conflicts with model.preset='{model.preset}' (which "
                                        f"fixes {arch[k]!r})" for k, v in bad.items())
                              + ": remove the field or set model.preset=custom")
    return {
        **arch, **chosen,
        "image_size": image_size, "in_channels": channels, "out_channels": channels, "num_classes": classes,
        "learn_sigma": learn_sigma, "dropout": model.dropout,
        "class_dropout_prob": model.class_dropout_prob if classes else 0.0,
        "use_checkpoint": model.use_checkpoint, "channels_last": model.channels_last,
    }


def build_unet(model: ModelConfig, *, image_size: int, channels: int, num_classes: int, learn_sigma: bool) -> UNet:
    """The UNet of a model section for the data's shape (see :func:`unet_config`)."""
    return UNet(**unet_config(model, image_size=image_size, channels=channels, num_classes=num_classes,
                              learn_sigma=learn_sigma))


def diffusion_card(d: DiffusionConfig) -> dict[str, Any]:
    """The ``diffusion`` section of config.json: the DiffusionConfig fields, as configured."""
    return d.model_dump(mode="json")


def diffusion_from_card(card: dict[str, Any]) -> GaussianDiffusion:
    """The diffusion of a registered model's config.json (validated as a DiffusionConfig)."""
    return build_diffusion(DiffusionConfig.model_validate(card["diffusion"]))


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """A state dict as safetensors (CPU, contiguous copies; safetensors refuses views and GPU tensors)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(path))


def write_model_dir(directory: str | Path, state_dict: dict[str, torch.Tensor], card: dict[str, Any]) -> Path:
    """Write ``weights.safetensors`` + ``config.json`` into ``directory`` (created)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_weights(state_dict, d / WEIGHTS)
    (d / CONFIG).write_text(json.dumps({"format_version": FORMAT_VERSION, **card}, indent=2, sort_keys=True))
    return d


@dataclass
class DiffusionSampler:
    """A UNet + its diffusion, ready to sample. Images are returned in [-1, 1], [B, C, H, W]."""

    unet: UNet
    card: dict[str, Any]
    device: torch.device = torch.device("cpu")
    info: dict[str, Any] = field(default_factory=dict)  # registry name/version/uri/run id when known

    def __post_init__(self) -> None:
        self.diffusion = diffusion_from_card(self.card)
        self.unet.eval().to(self.device)

    @property
    def image_size(self) -> int:
        return int(self.card["data"]["image_size"])

    @property
    def channels(self) -> int:
        return int(self.card["data"]["channels"])

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.get("num_classes") or 0)

    @property
    def num_timesteps(self) -> int:
        return int(self.card["diffusion"]["diffusion_steps"])

    def labels_for(self, num_samples: int, class_labels: list[int] | None) -> torch.Tensor | None:
        """Labels for a batch: the given ones (one, broadcast, or one per image), else 0,1,..,K-1 cycled."""
        return guidance.class_labels(num_samples, self.num_classes, class_labels)

    def _args(self, num_samples, class_labels, guidance_scale, generator, seed):
        if generator is None and seed is not None:
            # One generator per request, repeated per row: rows draw their noise in order from it, so the
            # request's images do not depend on what else shares the batch.
            g = torch.Generator().manual_seed(int(seed))
            generator = [g] * num_samples
        labels = self.labels_for(num_samples, class_labels)
        model, kwargs = guidance.conditioned_model(self.unet, None if labels is None else labels.to(self.device),
                                                   guidance_scale, null_label=self.num_classes,
                                                   eps_channels=self.channels)
        shape = (num_samples, self.channels, self.image_size, self.image_size)
        return model, kwargs, shape, generator

    @torch.no_grad()
    def sample(self, num_samples: int, *, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
               guidance_scale: float = 1.0, class_labels: list[int] | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None, seed: int | None = None,
               progress: bool = False) -> torch.Tensor:
        """Draw ``num_samples`` images with the named sampler; ``labels`` as in :meth:`labels_for`."""
        model, kwargs, shape, generator = self._args(num_samples, class_labels, guidance_scale, generator, seed)
        return core_sample(self.diffusion, model, shape, sampler=sampler, steps=steps, eta=eta,
                           generator=generator, model_kwargs=kwargs, device=self.device, progress=progress)

    @torch.no_grad()
    def sample_progressive(self, num_samples: int, *, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                           guidance_scale: float = 1.0, class_labels: list[int] | None = None,
                           generator: torch.Generator | list[torch.Generator] | None = None,
                           seed: int | None = None):
        """Like :meth:`sample` but yields the core's per-step dicts (``step``, ``total``, ``sample``, ...)."""
        model, kwargs, shape, generator = self._args(num_samples, class_labels, guidance_scale, generator, seed)
        yield from core_sample_progressive(self.diffusion, model, shape, sampler=sampler, steps=steps, eta=eta,
                                           generator=generator, model_kwargs=kwargs, device=self.device)


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> DiffusionSampler:
    """Rebuild a sampler from a directory holding ``weights.safetensors`` and ``config.json``."""
    d = Path(directory)
    if not (d / CONFIG).is_file() and (d / "artifacts" / CONFIG).is_file():
        d = d / "artifacts"  # a downloaded pyfunc model directory
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} is not a registered diffusion model: expected {CONFIG} and {WEIGHTS}")
    return sampler_from_state(read_card(d), load_file(str(d / WEIGHTS)), device)


def sampler_from_state(card: dict[str, Any], state_dict: dict[str, torch.Tensor],
                       device: str | torch.device = "cpu") -> DiffusionSampler:
    """Rebuild a sampler from a model card (``config.json`` content) and UNet weights."""
    unet = UNet.from_config(card["unet"])
    unet.load_state_dict(state_dict)
    return DiffusionSampler(unet=unet, card=card, device=torch.device(device))


@dataclass
class RegisteredModel:
    name: str
    version: str
    uri: str
    run_id: str


IDEMPOTENCE_TAG = "idempotence_key"


def find_version(model_name: str, idempotence_key: str) -> str | None:
    """The version of ``model_name`` created with this idempotence key (None when there is none)."""
    client = mlflow.MlflowClient()
    try:
        found = client.search_model_versions(f"name='{model_name}' and tags.{IDEMPOTENCE_TAG}='{idempotence_key}'")
    except mlflow.exceptions.MlflowException:
        return None  # no such registered model yet
    return str(min(int(v.version) for v in found)) if found else None


def log_and_register(state_dict: dict[str, torch.Tensor], card: dict[str, Any], *, run_id: str, model_name: str,
                     tags: dict[str, str] | None = None, alias: str | None = None,
                     idempotence_key: str | None = None, step: int = 0,
                     after_create: Callable[[str], None] | None = None) -> RegisteredModel:
    """Log the pyfunc model to ``run_id`` and register it as a new version of ``model_name`` (with tags/alias).

    With ``idempotence_key`` the version carries it (tag ``idempotence_key``) from the moment it is created, and
    a version that already carries it is reused instead: a registration killed at any point and run again leaves
    exactly one version. ``after_create(version)`` runs between creating the version and moving the alias (for
    fault drills). ``step`` is the training step the model is logged at: MLflow links the run's metrics at that step
    (the final loss, ...) to the LoggedModel. Uses the tracking URI already set with ``mlflow.set_tracking_uri``.
    """
    version = find_version(model_name, idempotence_key) if idempotence_key else None
    if version is None:
        with tempfile.TemporaryDirectory() as tmp:
            d = write_model_dir(tmp, state_dict, card)
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
                info = log_pyfunc_model(d, name=MODEL_NAME_IN_RUN, step=step)
        all_tags = {**(tags or {}), **({IDEMPOTENCE_TAG: idempotence_key} if idempotence_key else {})}
        mv = mlflow.register_model(info.model_uri, model_name, tags={k: str(v) for k, v in all_tags.items()})
        version = str(mv.version)
        if after_create is not None:
            after_create(version)
    if alias:
        mlflow.MlflowClient().set_registered_model_alias(model_name, alias, version)
    return RegisteredModel(name=model_name, version=version, uri=f"models:/{model_name}/{version}", run_id=run_id)


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def resolve_model_version(uri: str) -> dict[str, Any]:
    """Registry facts for a ``models:/`` URI (name, version, run id, tags); ``{}`` for other URIs."""
    m = _MODELS_URI.match(uri)
    if not m:
        return {}
    client = mlflow.MlflowClient()
    if m["alias"]:
        mv = client.get_model_version_by_alias(m["name"], m["alias"])
    else:
        mv = client.get_model_version(m["name"], m["version"])
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags or {}),
            "uri": uri}


def load_model(uri: str, *, device: str | torch.device = "cpu", tracking_uri: str | None = None) -> DiffusionSampler:
    """Any model URI (registry alias/version, runs:/, local dir) -> ready :class:`DiffusionSampler`."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if Path(uri).exists():
        return load_model_dir(uri, device)
    info = resolve_model_version(uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    sampler = load_model_dir(local, device)
    sampler.info = info or {"uri": uri}
    return sampler
