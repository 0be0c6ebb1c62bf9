"""Request and response models of the sampling endpoint (they also make its OpenAPI schema at ``/docs``).

Request models are strict (pydantic strict mode, no JSON coercion): a bool is not an int, ``"2"`` is not 2 and
``2.0`` is not an integer step count; each gets 422 naming the field. Static bounds live in the models; bounds
that depend on the served model or the configuration (``num_samples`` <= ``serve.max_samples_per_request``,
``steps`` <= T, labels < classes, the request's cost <= ``serve.max_request_cost``) are checked per request by
:func:`check_request`, which returns errors in FastAPI's 422 format.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipelines.config import SamplerName

# Request bodies larger than this are refused with 422 (loc ["body"]) before they are parsed (a valid body is < 1 KiB
# plus 8 bytes per class label).
MAX_BODY_BYTES = 64 * 1024
# Hard caps independent of the configuration, so a body can never make the server allocate much.
HARD_MAX_SAMPLES = 4096
MAX_SEED = 2**63 - 1


class GenerateRequest(BaseModel):
    """``POST /v1/generate``: what to sample."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    num_samples: int = Field(16, ge=1, le=HARD_MAX_SAMPLES,
                             description="Images to generate, 1..serve.max_samples_per_request.")
    sampler: SamplerName = Field("ddim", description="ddpm (ancestral), ddim or dpm_solver (DPM-Solver++ 2M).")
    steps: int = Field(50, ge=1, description="Model evaluations, 1..T (the model's diffusion steps).")
    eta: float = Field(0.0, ge=0.0, description="DDIM stochasticity (0 = deterministic); ddim only.")
    guidance_scale: float = Field(1.0, ge=0.0, description="Classifier-free guidance scale; 1 = no guidance.")
    class_labels: list[int] | None = Field(
        None, max_length=HARD_MAX_SAMPLES,
        description="One label for all images or one per image, each in [0, classes); null cycles 0..classes-1.",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="Seed of this request's noise; null = random (the used seed is returned).")


class StreamRequest(GenerateRequest):
    """``POST /v1/generate/stream``: a generate request plus the preview interval."""

    preview_every: int | None = Field(None, ge=1, description="Send a preview every k steps (null: ~4 previews).")


class ModelRef(BaseModel):
    name: str | None = None
    version: str | None = None
    uri: str


class GenerateResponse(BaseModel):
    """``POST /v1/generate`` answer (JSON)."""

    images: list[str] = Field(description="Base64-encoded PNG images, in request order.")
    seed: int
    model: ModelRef
    sampler: SamplerName
    steps: int
    batch_size: int = Field(description="The most rows in one UNet forward that included this request.")
    timings_ms: dict[str, float] = Field(description="queue, sample, encode and total milliseconds.")


class PreviewEvent(BaseModel):
    """One ``event: preview`` of the stream: the current x0 prediction after ``step`` of ``total`` steps."""

    step: int
    total: int
    images: list[str]


class ModelInfo(BaseModel):
    """``GET /v1/model``."""

    name: str | None
    version: str | None
    uri: str
    run_id: str | None
    image_size: int
    channels: int
    num_classes: int
    class_names: list[str] | None = None
    num_timesteps: int
    training_steps: int | None
    samplers: list[str]
    max_samples_per_request: int
    max_batch_size: int
    max_request_cost: int
    reload_interval_s: float
    device: str
    pack_ratio: float | None = None  # serve.pack_ratio as resolved for the device (auto: 4 on CPU, None on GPU)
    pack_rows: int | None = None  # the rows long requests may fill beside short ones (calibrated at load)
    fast: dict[str, Any] = {}  # diffusion_core's per-device choices (layout, attention, autocast, ...)


def _err(field: str, msg: str, value: Any) -> dict[str, Any]:
    return {"loc": ["body", field], "msg": msg, "type": "value_error", "input": value}


def request_cost(req: GenerateRequest) -> int:
    """Rows x steps, x2 with classifier-free guidance (the engine's unit of work)."""
    return req.num_samples * req.steps * (2 if req.guidance_scale != 1.0 else 1)


def check_request(req: GenerateRequest, *, max_samples: int, num_timesteps: int, num_classes: int,
                  max_cost: int | None = None) -> list[dict[str, Any]]:
    """Problems of ``req`` against the configuration and the served model (empty list: valid)."""
    errors = []
    if max_cost is not None and request_cost(req) > max_cost:
        msg = (f"num_samples x steps{' x 2 (guidance_scale != 1)' if req.guidance_scale != 1.0 else ''} = "
               f"{request_cost(req)} exceeds serve.max_request_cost={max_cost}")
        errors += [_err("num_samples", msg, req.num_samples), _err("steps", msg, req.steps)]
    if req.num_samples > max_samples:
        errors.append(_err("num_samples", f"num_samples must be at most serve.max_samples_per_request="
                                          f"{max_samples}", req.num_samples))
    if req.steps > num_timesteps:
        errors.append(_err("steps", f"steps must lie in [1, {num_timesteps}] (the model's diffusion steps)",
                           req.steps))
    if req.eta != 0.0 and req.sampler != "ddim":
        errors.append(_err("eta", f"eta applies to the ddim sampler only; {req.sampler} needs eta=0", req.eta))
    if num_classes == 0:
        if req.class_labels:
            errors.append(_err("class_labels", "the served model is unconditional: class_labels must be null",
                               req.class_labels))
        if req.guidance_scale != 1.0:
            errors.append(_err("guidance_scale", "classifier-free guidance needs a class-conditional model: "
                                                 "guidance_scale must be 1", req.guidance_scale))
    elif req.class_labels is not None:
        if len(req.class_labels) not in (1, req.num_samples):
            errors.append(_err("class_labels", f"class_labels must have 1 or num_samples={req.num_samples} "
                                               f"entries, got {len(req.class_labels)}", req.class_labels))
        bad = [c for c in req.class_labels if not 0 <= c < num_classes]
        if bad:
            errors.append(_err("class_labels", f"class labels must lie in [0, {num_classes - 1}], got {bad[:8]}",
                               req.class_labels))
    return errors
