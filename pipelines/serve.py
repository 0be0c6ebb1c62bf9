"""Ray Serve sampling endpoint: a FastAPI ingress deployment in front of a batched model deployment.

- ``DiffusionModel`` loads the registered model (``pipelines.model_io.load_model``: EMA weights, eval mode, on the
  GPU when ``serve.use_gpu``) and samples. Its ``generate`` method is a ``@serve.batch`` whose batch size is
  counted in images; :func:`pipelines.batching.run_jobs` runs one sampling call per (sampler, steps, eta,
  guidance_scale) group with per-request generators, so a request's images do not depend on its batch-mates.
- ``DiffusionIngress`` (FastAPI) validates requests (422 naming the field), encodes PNGs, turns Serve's
  backpressure (``max_queued_requests`` beyond ``max_ongoing_requests``) into 503 and streams SSE previews.

Entry points: :func:`build_app` (a ``serve run`` application builder), the module attribute ``app`` (built on
first access from ``DIFFUSION_PIPELINE_CONFIG`` / ``DIFFUSION_PIPELINE_MODEL_URI``), :func:`deploy` and
:func:`shutdown`. ``serve run`` started in the background ignores SIGINT: stop it with SIGTERM.
"""

# No ``from __future__ import annotations`` here: Serve's ingress re-wraps the route methods, and FastAPI must
# see real classes (not strings) in their signatures.
import asyncio
import json
import os
import secrets
import signal
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from diffusion_core.samplers import SAMPLERS
from pipelines.batching import SampleJob, images_in, progressive_events, run_jobs
from pipelines.config import PipelineConfig, ServeConfig, load_config
from pipelines.serve_schemas import (
    MAX_BODY_BYTES,
    GenerateRequest,
    GenerateResponse,
    ModelInfo,
    ModelRef,
    PreviewEvent,
    StreamRequest,
    check_request,
)

APP_NAME = "diffusion"
ENV_CONFIG = "DIFFUSION_PIPELINE_CONFIG"
ENV_MODEL_URI = "DIFFUSION_PIPELINE_MODEL_URI"
ENV_OVERRIDES = "DIFFUSION_PIPELINE_SET"  # ";"-separated KEY=VALUE overrides


# ---------------------------------------------------------------------------------------------- model replica
@serve.deployment(name="DiffusionModel")
class DiffusionModel:
    """Holds one loaded sampler; batched ``generate`` and unbatched ``stream``."""

    def __init__(self, model_uri: str, tracking_uri: str | None, serve_cfg: dict[str, Any]) -> None:
        import torch

        from pipelines.model_io import load_model

        self.cfg = ServeConfig(**serve_cfg)
        torch.set_num_threads(self.cfg.threads_per_replica or max(1, int(self.cfg.cpus_per_replica)))
        device = "cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu"
        self.sampler = load_model(model_uri, device=device, tracking_uri=tracking_uri)
        self.model_uri = model_uri
        # Batch size counts images (the config guarantees one request of max_samples_per_request fits).
        self.max_images = self.cfg.max_batch_size
        self.generate.set_max_batch_size(self.max_images)
        self.generate.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    def describe(self) -> dict[str, Any]:
        """Registry and shape facts of the loaded model (``GET /v1/model``)."""
        s, info, card = self.sampler, self.sampler.info or {}, self.sampler.card
        training = card.get("training", {})
        return ModelInfo(
            name=info.get("name"), version=info.get("version"), uri=info.get("uri", self.model_uri),
            run_id=info.get("run_id") or training.get("run_id"), image_size=s.image_size, channels=s.channels,
            num_classes=s.num_classes, class_names=card.get("data", {}).get("class_names"),
            num_timesteps=s.num_timesteps, training_steps=training.get("steps"),
            samplers=list(SAMPLERS), max_samples_per_request=self.cfg.max_samples_per_request,
            max_batch_size=self.max_images, device=str(s.device),
        ).model_dump()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, batch_size_fn=images_in)
    async def generate(self, jobs: list[SampleJob]) -> list:
        # Sampling blocks: run it off the event loop so requests keep queueing into the next batch.
        return await asyncio.to_thread(run_jobs, self.sampler, jobs)

    async def stream(self, job: SampleJob, preview_every: int | None):
        yield {"event": "start", "total": job.steps}
        events = progressive_events(self.sampler, job, preview_every)
        while (event := await asyncio.to_thread(next, events, None)) is not None:
            yield event


# ---------------------------------------------------------------------------------------------- HTTP ingress
class BodyLimit:
    """ASGI middleware: POST bodies over ``limit`` bytes get 422 (field "body") before parsing (chunked bodies included)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                response = JSONResponse(status_code=422, content={"detail": [{
                    "loc": ["body"], "type": "body_too_large",
                    "msg": f"request body larger than {self.limit} bytes"}]})
                return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


api = FastAPI(
    title="diffusion-pipeline sampling API",
    version="1",
    description="Batched diffusion sampling from a model in the MLflow registry. Bad input answers 422 naming "
                "the field; overload answers 503.",
)
api.add_middleware(BodyLimit)

_ERRORS = {422: {"description": "Invalid field, or a body over the size limit (named in detail)"},
           503: {"description": "Overloaded (retry later) or model not loaded"}}


def _unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": errors})


def _overloaded(what: str) -> JSONResponse:
    return JSONResponse(status_code=503, headers={"Retry-After": "1"},
                        content={"detail": f"{what}: too many requests in flight, retry later"})


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@serve.deployment(name="DiffusionIngress")
@serve.ingress(api)
class DiffusionIngress:
    """HTTP face: validation, PNG encoding, 503 on backpressure, SSE streaming."""

    def __init__(self, model: DeploymentHandle, serve_cfg: dict[str, Any], tracking_uri: str | None = None) -> None:
        from pipelines.playground import mlflow_ui_url

        self.model = model
        self.cfg = ServeConfig(**serve_cfg)
        self._info: ModelInfo | None = None
        self.mlflow_ui = mlflow_ui_url(tracking_uri)

    async def info(self) -> ModelInfo:
        if self._info is None:
            self._info = ModelInfo(**await self.model.describe.remote())
        return self._info

    async def describe(self) -> dict[str, Any]:
        """Model facts for Python callers of the ingress handle (``deploy``)."""
        return (await self.info()).model_dump()

    async def _job(self, body: GenerateRequest) -> tuple[SampleJob | None, JSONResponse | None]:
        info = await self.info()
        errors = check_request(body, max_samples=self.cfg.max_samples_per_request,
                               num_timesteps=info.num_timesteps, num_classes=info.num_classes)
        if errors:
            return None, _unprocessable(errors)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        return SampleJob(num_samples=body.num_samples, seed=seed, sampler=body.sampler, steps=body.steps,
                         eta=body.eta, guidance_scale=body.guidance_scale, class_labels=body.class_labels), None

    def _ref(self, info: ModelInfo) -> ModelRef:
        return ModelRef(name=info.name, version=info.version, uri=info.uri)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """The playground page (pipelines/playground): form, live previews, final grid."""
        from pipelines.playground import render_page

        return HTMLResponse(render_page(self.mlflow_ui))

    @api.get("/healthz", responses={503: _ERRORS[503]})
    async def healthz(self):
        """200 once the model replica has loaded the model."""
        try:
            info = await asyncio.wait_for(self.info(), timeout=10)
        except Exception as e:  # not loaded (yet), or unreachable
            return JSONResponse(status_code=503, content={"status": "unavailable", "detail": str(e)})
        return {"status": "ok", "model": info.uri}

    @api.get("/v1/model", response_model=ModelInfo)
    async def model_info(self) -> ModelInfo:
        """Registry name, version, run id, image size, classes, training steps of the served model."""
        return await self.info()

    @api.post("/v1/generate", response_model=GenerateResponse,
              responses={**_ERRORS, 200: {"content": {"image/png": {}},
                                          "description": "JSON, or one PNG grid with `Accept: image/png`"}})
    async def generate(self, body: GenerateRequest, request: Request):
        """Sample ``num_samples`` images; concurrent requests share batched sampling runs."""
        job, error = await self._job(body)
        if error is not None:
            return error
        try:
            result = await self.model.generate.remote(job)
        except BackPressureError:
            return _overloaded("model")
        if result.error is not None:
            return _unprocessable([{"loc": ["body"], "msg": result.error, "type": "value_error"}])
        from pipelines.images import make_grid, png_bytes, to_png_b64

        start = time.time()
        if "image/png" in request.headers.get("accept", ""):
            png = await asyncio.to_thread(lambda: png_bytes(make_grid(result.images)))
            return Response(content=png, media_type="image/png",
                            headers={"X-Seed": str(job.seed), "X-Batch-Size": str(result.batch_size)})
        images = await asyncio.to_thread(to_png_b64, result.images)
        end = time.time()
        return GenerateResponse(
            images=images, seed=job.seed, model=self._ref(await self.info()), sampler=job.sampler,
            steps=job.steps, batch_size=result.batch_size,
            timings_ms={"queue": round(result.queue_ms, 2), "sample": round(result.sample_ms, 2),
                        "encode": round((end - start) * 1000, 2),
                        "total": round((end - job.received_at) * 1000, 2)},
        )

    @api.post("/v1/generate/stream", responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def generate_stream(self, body: StreamRequest):
        """Server-sent events: ``preview`` (x0 prediction every k steps), then ``final`` (a GenerateResponse)."""
        job, error = await self._job(body)
        if error is not None:
            return error
        events = self.model.options(stream=True).stream.remote(job, body.preview_every)
        try:
            first = await events.__anext__()  # backpressure surfaces here, before the 200 is sent
        except BackPressureError:
            return _overloaded("model")
        info = await self.info()

        async def sse():
            from pipelines.images import to_png_b64

            yield _sse("start", {"seed": job.seed, "total": first["total"], "num_samples": job.num_samples})
            try:
                async for ev in events:
                    images = await asyncio.to_thread(to_png_b64, ev["images"])
                    if ev["event"] == "preview":
                        yield _sse("preview", PreviewEvent(step=ev["step"], total=ev["total"],
                                                           images=images).model_dump())
                    else:
                        total_ms = round((time.time() - job.received_at) * 1000, 2)
                        final = GenerateResponse(images=images, seed=job.seed, model=self._ref(info),
                                                 sampler=job.sampler, steps=job.steps,
                                                 batch_size=job.num_samples, timings_ms={"total": total_ms})
                        yield _sse("final", final.model_dump())
            except Exception as e:  # the stream has started: report in-band
                yield _sse("error", {"detail": f"{type(e).__name__}: {e}"})

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Seed": str(job.seed)})


# ---------------------------------------------------------------------------------------------- app building
def resolve_model_uri(cfg: PipelineConfig) -> str:
    """``serve.model_uri`` or ``models:/<registry.model_name>@<registry.champion_alias>``."""
    return cfg.serve.model_uri or f"models:/{cfg.registry.model_name}@{cfg.registry.champion_alias}"


def _config_from_args(args: dict[str, Any]) -> PipelineConfig:
    overrides = args.get("set") or os.environ.get(ENV_OVERRIDES) or []
    if isinstance(overrides, str):
        overrides = [o for o in overrides.split(";") if o.strip()]
    cfg = load_config(args.get("config") or os.environ.get(ENV_CONFIG), list(overrides))
    uri = args.get("model_uri") or os.environ.get(ENV_MODEL_URI)
    return with_model_uri(cfg, uri) if uri else cfg


def with_model_uri(cfg: PipelineConfig, model_uri: str | None) -> PipelineConfig:
    """A copy of ``cfg`` serving ``model_uri`` (unchanged when None)."""
    if not model_uri:
        return cfg
    return cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model_uri": model_uri})})


def build_app(cfg_or_args: PipelineConfig | dict[str, Any] | None = None):
    """The Serve application (ingress bound to the model deployment).

    Accepts a :class:`PipelineConfig`, or ``serve run``'s argument dict: ``config`` (YAML path), ``model_uri``,
    ``set`` (list or ";"-separated ``KEY=VALUE``), falling back to the ``DIFFUSION_PIPELINE_*`` environment.
    Example: ``serve run pipelines.serve:build_app config=configs/quickstart.yaml``.
    """
    if isinstance(cfg_or_args, PipelineConfig):
        cfg = cfg_or_args
    else:
        cfg = _config_from_args(dict(cfg_or_args or {}))
    s = cfg.serve
    actor = {"num_cpus": s.cpus_per_replica, **({"num_gpus": 1} if s.use_gpu else {})}
    scale: dict[str, Any] = (
        {"autoscaling_config": s.autoscaling_config} if s.autoscaling_config else {"num_replicas": s.num_replicas}
    )
    model = DiffusionModel.options(
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        ray_actor_options=actor, **scale,
    ).bind(resolve_model_uri(cfg), cfg.tracking_uri, s.model_dump(mode="json"))
    replicas = int((s.autoscaling_config or {}).get("max_replicas", s.num_replicas))
    capacity = replicas * (s.max_ongoing_requests + s.max_queued_requests)
    # The ingress admits more than the model can hold, so overload is refused by the model's queue bound (503)
    # while /healthz and validation keep answering; its own queue bound stops unbounded piling up at the proxy.
    return DiffusionIngress.options(
        max_ongoing_requests=2 * capacity + 16, max_queued_requests=capacity + 16,
        ray_actor_options={"num_cpus": 0},
    ).bind(model, s.model_dump(mode="json"), cfg.tracking_uri)


def __getattr__(name: str):
    # ``serve run pipelines.serve:app`` / KubeRay import path: built on first access, not at import.
    if name == "app":
        return build_app(None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DeployResult(BaseModel):
    """What the deploy stage reports."""

    url: str
    app_name: str
    model: ModelInfo
    smoke_test: dict[str, Any] | None = None  # deploy_and_check: one tiny request through HTTP


def deploy(cfg: PipelineConfig, model_uri: str | None = None, *, blocking: bool = False) -> DeployResult:
    """Start Serve on ``serve.host:serve.port`` and run the app; with ``blocking`` serve until SIGINT/SIGTERM.

    Serve's controller is a detached actor: the app outlives the calling process (or Ray task) until
    :func:`shutdown` or the end of the Ray cluster. A Serve instance already running keeps its HTTP host/port.
    """
    from pipelines.tracking import ensure_ray

    cfg = with_model_uri(cfg, model_uri)
    ensure_ray(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    handle = serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    info = ModelInfo(**handle.describe.remote().result())
    result = DeployResult(url=f"http://{cfg.serve.host}:{cfg.serve.port}", app_name=APP_NAME, model=info)
    if blocking:
        _block_until_signal()
    return result


def deploy_and_check(cfg: PipelineConfig, model_uri: str | None = None, *, timeout_s: float = 120.0) -> DeployResult:
    """:func:`deploy`, then ``GET /healthz`` and one 1-image, 2-step request over HTTP (the DAG's deploy stage).

    Raises RuntimeError naming the URL and the answer when the endpoint does not work.
    """
    import requests

    result = deploy(cfg, model_uri)
    t = time.time()
    try:
        health = requests.get(f"{result.url}/healthz", timeout=timeout_s)
        r = requests.post(f"{result.url}/v1/generate", json={"num_samples": 1, "steps": 2, "seed": 0},
                          timeout=timeout_s)
    except requests.RequestException as e:
        raise RuntimeError(f"deployed, but {result.url} does not answer: {e}") from None
    if health.status_code != 200 or r.status_code != 200:
        raise RuntimeError(f"deployed, but {result.url} is not healthy: /healthz {health.status_code}, "
                           f"/v1/generate {r.status_code} {r.text[:500]}")
    body = r.json()
    result.smoke_test = {"images": len(body["images"]), "seed": body["seed"],
                         "latency_ms": round((time.time() - t) * 1000, 1)}
    return result


def app_running() -> bool:
    """True when the diffusion app is deployed and RUNNING on the connected Ray cluster."""
    try:
        status = serve.status().applications.get(APP_NAME)
    except Exception:
        return False
    return status is not None and str(getattr(status.status, "value", status.status)) == "RUNNING"


def serve_forever(cfg: PipelineConfig, model_uri: str | None = None) -> None:
    """Deploy (unless the app already runs, e.g. after the DAG's deploy stage) and serve until Ctrl-C/SIGTERM,
    then shut Serve down."""
    from pipelines.tracking import ensure_ray

    ensure_ray(cfg)
    if model_uri or not app_running():
        deploy(cfg, model_uri)
    print(f"serving on http://{cfg.serve.host}:{cfg.serve.port} (docs at /docs); Ctrl-C or SIGTERM stops", flush=True)
    _block_until_signal()


def _block_until_signal() -> None:
    def _stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutdown()


def shutdown() -> None:
    """Stop every Serve application and the HTTP proxy (Ray itself keeps running)."""
    serve.shutdown()
