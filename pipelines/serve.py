"""Ray Serve sampling endpoint: a FastAPI ingress deployment whose replicas each run the sampling engine.

- Every replica of ``DiffusionIngress`` owns one :class:`pipelines.engine.Engine` whose loop runs in a thread:
  step-level continuous batching with per-row ``t``, cancellation at step boundaries, admission by cost
  (``serve.max_request_cost``, ``serve.max_queue_cost``) and ``serve.request_timeout_s``. Streams (SSE) are
  ordinary engine requests with previews.
- :class:`ModelFollower` loads the served model in the background and follows its registry alias: it polls
  every ``serve.reload_interval_s`` (and on :meth:`DiffusionIngress.reload`), loads a moved alias's version and
  swaps it in between steps; requests in flight finish on the version they started with. A version that fails
  to load leaves the old one serving (logged).
- HTTP: strict request schema (422 naming the field, no coercion), 503 (+ ``Retry-After``) when the queue is full
  or before the first model has loaded, 504 past the request timeout, 500 with a request id for our faults.

Entry points: :func:`build_app` (a ``serve run`` application builder), the module attribute ``app`` (built on
first access from ``DIFFUSION_PIPELINE_CONFIG`` / ``DIFFUSION_PIPELINE_MODEL_URI``), :func:`deploy`,
:func:`deploy_and_check`, :func:`serve_forever`, :func:`trigger_reload` and :func:`shutdown`. ``serve run``
started in the background ignores SIGINT: stop it with SIGTERM.
"""

# No ``from __future__ import annotations`` here: Serve's ingress re-wraps the route methods, and FastAPI must
# see real classes (not strings) in their signatures.
import asyncio
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve

from diffusion_core.models import fast_defaults
from diffusion_core.samplers import SAMPLERS
from pipelines.config import PipelineConfig, ServeConfig, load_config, resolve_pack_ratio
from pipelines.engine import (
    Engine,
    EngineError,
    NotReady,
    Overloaded,
    SampleResult,
    SampleSpec,
    TimedOut,
    TooCostly,
)
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
log = logging.getLogger("pipelines.serve")
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")


def default_preview_every(steps: int) -> int:
    """About four previews per run."""
    return max(1, int(steps) // 4)


# ---------------------------------------------------------------------------------------------- live rollout
class ModelFollower:
    """Loads the served model into an engine and follows a ``models:/name@alias`` URI.

    A background thread checks the alias at start, every ``reload_interval_s`` (0: only when woken by
    :meth:`check_now`) and, before the first load succeeds, every few seconds. A new version is loaded pinned
    (``models:/name/<version>``) off the loop thread, then swapped in between steps. Other URIs (a version,
    ``runs:/``, a directory) are loaded once.
    """

    RETRY_S = 5.0

    def __init__(self, engine: Engine, uri: str, tracking_uri: str | None, cfg: ServeConfig, device: str) -> None:
        self.engine, self.uri, self.tracking_uri, self.cfg, self.device = engine, uri, tracking_uri, cfg, device
        self.follows_alias = _ALIAS_URI.match(uri) is not None
        self.first_attempt = threading.Event()
        self.load_error: str | None = None
        self.failed: dict[str, str] = {}  # version -> why it did not load (not retried)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="model-follower", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.check()
            self.first_attempt.set()
            loaded = self.engine.model is not None
            if not loaded:
                wait = self.RETRY_S
            elif self.follows_alias and self.cfg.reload_interval_s > 0:
                wait = self.cfg.reload_interval_s
            else:
                wait = None
            self._wake.wait(wait)
            self._wake.clear()

    def check_now(self) -> None:
        """Wake the follower (the promote stage's immediate reload)."""
        self._wake.set()

    def _target(self) -> tuple[str, dict[str, Any]]:
        """(URI to load, registry facts) of what the served URI points at now."""
        from pipelines.model_io import resolve_model_version

        info = resolve_model_version(self.uri)
        if self.follows_alias:
            return f"models:/{info['name']}/{info['version']}", info
        return self.uri, info

    def check(self) -> str | None:
        """Load and swap in the URI's current version if it is not the one served; returns the served version.
        Never raises: a failure is logged and the old version keeps serving."""
        from pipelines.model_io import load_model

        with self._lock:
            version = None
            try:
                if self.tracking_uri:
                    import mlflow

                    mlflow.set_tracking_uri(self.tracking_uri)
                load_uri, info = self._target()
                version = info.get("version")
                if self.engine.model is not None and (version == self.engine.version or not self.follows_alias):
                    return self.engine.version
                if version in self.failed:
                    return self.engine.version
                sampler = load_model(load_uri, device=self.device, tracking_uri=self.tracking_uri)
                sampler.info = {**(sampler.info or {}), **info, "uri": self.uri}
                slot = self.engine.prepare(sampler, version)
                cost = self.cfg.request_cost_bound(sampler.num_timesteps)
                self.engine.max_request_cost = cost
                self.engine.max_queue_cost = self.cfg.max_queue_cost or 8 * cost
                self.engine.swap(slot)
                self.load_error = None
                log.info("serving %s version %s", self.uri, version)
            except Exception as e:  # keep serving what we have
                why = f"{type(e).__name__}: {e}"
                if version is not None:
                    self.failed[version] = why
                if self.engine.model is None:
                    self.load_error = why
                log.warning("could not load %s (version %s): %s; still serving version %s", self.uri, version, why,
                            self.engine.version)
            return self.engine.version


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
    version="2",
    description="Diffusion sampling from a model in the MLflow registry, continuously batched at the step level. "
                "Bad input answers 422 naming the field (no type coercion); a full queue or a model not yet loaded "
                "503 with Retry-After; a request past serve.request_timeout_s 504; a server fault 500 with a "
                "request id.",
)
api.add_middleware(BodyLimit)

_ERRORS = {422: {"description": "Invalid field, or a body over the size limit (named in detail)"},
           500: {"description": "Server fault (detail names a request id to look up in the logs)"},
           503: {"description": "Queue full (retry after Retry-After seconds) or model not loaded yet"},
           504: {"description": "Not done within serve.request_timeout_s"}}


def _unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": errors})


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse(status_code=503, headers={"Retry-After": "1"}, content={"detail": detail})


def _fault(e: BaseException) -> JSONResponse:
    """500 with a request id; the exception goes to the log only."""
    rid = uuid.uuid4().hex[:12]
    log.error("request %s failed: %s: %s", rid, type(e).__name__, e, exc_info=e)
    return JSONResponse(status_code=500, headers={"X-Request-Id": rid},
                        content={"detail": "internal server error", "request_id": rid})


@api.exception_handler(Exception)
async def _unhandled(request: Request, exc: Exception):
    return _fault(exc)


def _engine_error(e: EngineError) -> JSONResponse:
    if isinstance(e, TooCostly):
        return _unprocessable([{"loc": ["body", f], "msg": str(e), "type": "value_error"}
                               for f in ("num_samples", "steps")])
    if isinstance(e, (Overloaded, NotReady)):
        return _unavailable(str(e))
    if isinstance(e, TimedOut):
        return JSONResponse(status_code=504, content={"detail": str(e)})
    return _fault(e)


INLINE_ENCODE_ELEMENTS = 1 << 16  # a batch this small encodes faster than a hop to a worker thread (~0.2 ms)


async def _encode(fn, images):
    """``fn(images)`` (PNG encoding) off the event loop for large batches, inline for small ones; never on the
    engine's loop thread."""
    if images.numel() <= INLINE_ENCODE_ELEMENTS:
        return fn(images)
    return await asyncio.to_thread(fn, images)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _ref(result: SampleResult) -> ModelRef:
    info = result.model_info
    return ModelRef(name=info.get("name"), version=result.version or info.get("version"), uri=info.get("uri", ""))


async def _until_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _outcome(ticket, request: Request) -> SampleResult | None:
    """The ticket's result, or None when the client went away first (the request is then cancelled)."""
    work = asyncio.wrap_future(ticket.future)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # Serve cancels the handler when the client disconnects
        ticket.cancel()
        work.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
    finally:
        gone.cancel()
    if not work.done():
        ticket.cancel()
        work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: nobody waits for it
        return None
    return work.result()


@serve.deployment(name="DiffusionIngress")
@serve.ingress(api)
class DiffusionIngress:
    """One replica: the HTTP face (validation, PNG encoding, SSE) and its sampling engine."""

    def __init__(self, model_uri: str, tracking_uri: str | None, serve_cfg: dict[str, Any]) -> None:
        import torch

        from pipelines.playground import mlflow_ui_url

        self.mlflow_ui = mlflow_ui_url(tracking_uri)
        self.cfg = cfg = ServeConfig(**serve_cfg)
        torch.set_num_threads(cfg.threads_per_replica or max(1, int(cfg.cpus_per_replica)))
        device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
        self.model_uri = model_uri
        self.engine = Engine(max_batch_size=cfg.max_batch_size, max_request_cost=cfg.max_request_cost or 1,
                             max_queue_cost=cfg.max_queue_cost or 1, request_timeout_s=cfg.request_timeout_s,
                             compile=cfg.compile, pack_ratio=resolve_pack_ratio(cfg.pack_ratio, device),
                             pack_rows=cfg.pack_rows).start()
        self.follower = ModelFollower(self.engine, model_uri, tracking_uri, cfg, device)
        self.fast = fast_defaults(device)  # the core's per-device choices, reported by /v1/model

    def check_health(self) -> None:
        """Serve's replica health check: a dead sampling loop gets the replica restarted."""
        if not self.engine.alive:
            raise RuntimeError("the sampling loop is not running")

    def _info(self) -> ModelInfo | None:
        s = self.engine.model
        if s is None:
            return None
        info, card = s.info or {}, s.card
        training = card.get("training", {})
        return ModelInfo(
            name=info.get("name"), version=self.engine.version or info.get("version"),
            uri=info.get("uri", self.model_uri), run_id=info.get("run_id") or training.get("run_id"),
            image_size=s.image_size, channels=s.channels, num_classes=s.num_classes,
            class_names=card.get("data", {}).get("class_names"), num_timesteps=s.num_timesteps,
            training_steps=training.get("steps"), samplers=list(SAMPLERS),
            max_samples_per_request=self.cfg.max_samples_per_request, max_batch_size=self.cfg.max_batch_size,
            max_request_cost=self.engine.max_request_cost, reload_interval_s=self.cfg.reload_interval_s,
            device=str(s.device), pack_ratio=self.engine.packing[0], pack_rows=self.engine.packing[1],
            fast=self.fast,
        )

    async def describe(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Model facts for Python callers of the handle (``deploy``): waits for the first load, raises its error."""
        deadline = time.monotonic() + timeout_s
        while self.engine.model is None:
            if self.follower.first_attempt.is_set() and self.follower.load_error:
                raise RuntimeError(f"could not load {self.model_uri}: {self.follower.load_error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.model_uri} not loaded after {timeout_s} s")
            await asyncio.sleep(0.1)
        return self._info().model_dump()

    async def reload(self) -> str | None:
        """Check the served alias now and swap in a moved version (returns the version served after)."""
        return await asyncio.to_thread(self.follower.check)

    def _spec(self, body: GenerateRequest, preview_every: int | None = None):
        """(SampleSpec, None) or (None, error response) for a validated body."""
        info = self._info()
        if info is None:
            return None, _unavailable(f"model not loaded yet ({self.follower.load_error or 'loading'})")
        errors = check_request(body, max_samples=self.cfg.max_samples_per_request,
                               num_timesteps=info.num_timesteps, num_classes=info.num_classes,
                               max_cost=self.engine.max_request_cost)
        if errors:
            return None, _unprocessable(errors)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        return SampleSpec(num_samples=body.num_samples, seed=seed, sampler=body.sampler, steps=body.steps,
                          eta=body.eta, guidance_scale=body.guidance_scale, class_labels=body.class_labels,
                          preview_every=preview_every), None

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """The playground page (pipelines/playground): form, live previews, final grid."""
        from pipelines.playground import render_page

        return HTMLResponse(render_page(self.mlflow_ui))

    @api.get("/healthz", responses={503: _ERRORS[503]})
    async def healthz(self):
        """200 while the sampling loop runs and a model is loaded; the body is the engine's live state."""
        state = self.engine.health()
        ok = state["loop_alive"] and state["model_loaded"]
        body = {"status": "ok" if ok else "unavailable", "model": self.model_uri, **state,
                "load_error": self.follower.load_error, "failed_versions": dict(self.follower.failed)}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @api.get("/v1/model", response_model=ModelInfo, responses={503: _ERRORS[503]})
    async def model_info(self):
        """Registry name, version, run id, image size, classes, training steps and limits of the served model."""
        info = self._info()
        return info if info is not None else _unavailable("model not loaded yet")

    @api.post("/v1/generate", response_model=GenerateResponse,
              responses={**_ERRORS, 200: {"content": {"image/png": {}},
                                          "description": "JSON, or one PNG grid with `Accept: image/png`"}})
    async def generate(self, body: GenerateRequest, request: Request):
        """Sample ``num_samples`` images; concurrent requests share UNet forwards step by step."""
        received = time.perf_counter()
        spec, error = self._spec(body)
        if error is not None:
            return error
        try:
            ticket = self.engine.submit(spec)
            result = await _outcome(ticket, request)
        except EngineError as e:
            return _engine_error(e)
        if result is None:  # the client has gone: nobody reads this
            return Response(status_code=499)
        from pipelines.images import make_grid, png_bytes, to_png_b64

        start = time.perf_counter()
        headers = {"X-Seed": str(spec.seed), "X-Batch-Size": str(result.batch_size),
                   "X-Model-Version": str(result.version)}
        if "image/png" in request.headers.get("accept", ""):
            png = await _encode(lambda images: png_bytes(make_grid(images)), result.images)
            return Response(content=png, media_type="image/png", headers=headers)
        images = await _encode(to_png_b64, result.images)
        end = time.perf_counter()
        return GenerateResponse(
            images=images, seed=spec.seed, model=_ref(result), sampler=spec.sampler, steps=spec.steps,
            batch_size=result.batch_size,
            timings_ms={"queue": round(result.queue_ms, 2), "sample": round(result.sample_ms, 2),
                        "encode": round((end - start) * 1000, 2), "total": round((end - received) * 1000, 2)},
        )

    @api.post("/v1/generate/stream", responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def generate_stream(self, body: StreamRequest):
        """Server-sent events: ``start``, ``preview`` (x0 prediction every k steps), then ``final`` (a
        GenerateResponse) or ``error``. A stream is an ordinary engine request; closing it cancels the request."""
        received = time.perf_counter()
        spec, error = self._spec(body, body.preview_every or default_preview_every(body.steps))
        if error is not None:
            return error
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            ticket = self.engine.submit(spec, on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except EngineError as e:
            return _engine_error(e)
        ticket.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(events.put_nowait, None))
        return StreamingResponse(self._sse(spec, ticket, events, received), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Seed": str(spec.seed)})

    async def _sse(self, spec: SampleSpec, ticket, events: asyncio.Queue, received: float):
        from pipelines.images import to_png_b64

        try:
            yield _sse("start", {"seed": spec.seed, "total": spec.steps, "num_samples": spec.num_samples})
            while (ev := await events.get()) is not None:
                images = await _encode(to_png_b64, ev["images"])
                yield _sse("preview", PreviewEvent(step=ev["step"], total=ev["total"], images=images).model_dump())
            try:
                result = ticket.future.result()
            except EngineError as e:
                status = 500 if type(e) is EngineError else e.status
                rid = uuid.uuid4().hex[:12]
                if status == 500:
                    log.error("stream %s failed: %s", rid, e)
                yield _sse("error", {"status": status, "request_id": rid,
                                     "detail": "internal server error" if status == 500 else str(e)})
                return
            images = await _encode(to_png_b64, result.images)
            total_ms = round((time.perf_counter() - received) * 1000, 2)
            final = GenerateResponse(images=images, seed=spec.seed, model=_ref(result), sampler=spec.sampler,
                                     steps=spec.steps, batch_size=result.batch_size,
                                     timings_ms={"queue": round(result.queue_ms, 2),
                                                 "sample": round(result.sample_ms, 2), "total": total_ms})
            yield _sse("final", final.model_dump())
        finally:  # the client closed the stream (or it ended): free the rows at the next step
            ticket.cancel()


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
    """The Serve application: ``DiffusionIngress`` replicas, each serving HTTP and running a sampling engine.

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
    # Each replica answers HTTP and runs its engine: overload is refused by the engine's cost-bounded queue (503
    # with Retry-After) while /healthz and validation keep answering; Serve's own bounds stop unbounded piling up.
    return DiffusionIngress.options(
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        ray_actor_options=actor, **scale,
    ).bind(resolve_model_uri(cfg), cfg.tracking_uri, s.model_dump(mode="json"))


def trigger_reload() -> list[str | None]:
    """Ask the running app's replicas to check their alias now (the promote stage's immediate reload); returns the
    versions they answered with, [] when no app runs here. Replicas not reached catch up at their next poll."""
    if not app_running():
        return []
    handle = serve.get_app_handle(APP_NAME)
    try:
        replicas = int(serve.status().applications[APP_NAME].deployments["DiffusionIngress"].replica_states
                       .get("RUNNING", 1))
    except Exception:
        replicas = 1
    return [handle.reload.remote().result(timeout_s=600) for _ in range(max(1, replicas))]


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
