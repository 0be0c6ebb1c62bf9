"""Step-level continuous-batching sampling engine. Imports torch and ``diffusion_core`` only (no Ray, no HTTP).

One loop thread owns the model(s). Every admitted request is a set of rows with its own state (sampler, respaced
timesteps, position, eta, guidance scale, labels, generator, DPM-Solver++ history). Each iteration of the loop
is one step boundary:

1. apply a pending model swap (new requests bind to the new version; requests in flight keep theirs),
2. admit everything submitted since the last boundary (nothing waits for a batch to fill),
3. drop cancelled and timed-out requests (their rows are freed at once),
4. pack rows of the active requests, in fairness order, into ONE UNet forward of at most ``max_batch_size`` rows
   with per-row ``t`` (a guided row contributes a conditional and an unconditional row; a request with more rows
   than the bound is spread over several forwards),
5. every request whose rows all have their model output for the current step gets its own update
   (``diffusion_core.steps``), previews, and leaves when it is done.

A request's images depend only on its own seed and parameters: its noise comes from its own generator in the
same order as ``diffusion_core.samplers.sample`` with ``generator=[g] * n`` (so the engine reproduces
``DiffusionSampler.sample(seed=...)``), and its update never reads another request's rows.

Fairness: least remaining work first (remaining rows x steps, x2 when guided), with aging. Serving the request
that will finish soonest minimises mean latency (shortest-remaining-processing-time) and keeps a 2-step request
from waiting behind a thousand-step one; a request left out of ``starve_after`` consecutive forwards goes first, so
long requests are never starved by a stream of short ones.

Packing: by default it is work-conserving: the forward is filled up to the bound in that order, so when the active
rows fit every request advances at every forward. That is right for a GPU, where a forward of 16 rows costs about
one of 1. On a CPU a forward's time grows with its rows (quickstart UNet, 1 thread: batch 16 costs ~3.4x batch 1),
and a short request sharing forwards with many long ones pays that factor at each of its steps: 12 DDPM-1000 rows
beside 4 DDIM-10 rows make every DDIM step a 16-row forward. ``pack_ratio`` splits requests by size: a request
costing more than ``pack_ratio`` x the cheapest active request's cost is *long*. Short requests (and starved
ones) fill the forward; long ones fill it only up to ``pack_rows`` rows. So while short requests are active a
forward has at most max(short rows, ``pack_rows``) rows plus starved ones, and a short request's step costs about
one ``pack_rows``-row forward instead of a full one; long requests keep advancing, ``pack_rows`` - (short rows) of
them per forward in least-remaining order, the rest within ``starve_after`` + 1 forwards (aging). When all active
requests are of similar size (e.g. uniform 1-image requests at any progress) none is long and every forward is
full: the class is by request size, not progress, so throughput under uniform load is untouched. Choose
``pack_rows`` is the forward size that costs at most ~2.5x a 1-row forward on the device: by default (None) the
engine measures it when it prepares a model (:func:`calibrate_pack_rows`; 8 for the quickstart UNet on one quiet
CPU thread, less on a loaded machine where big forwards slow down more); a GPU needs no ``pack_ratio`` at all.

Cost: rows x steps (x2 with guidance). A request over ``max_request_cost`` is refused (:class:`TooCostly`);
the outstanding cost of all admitted requests is bounded by ``max_queue_cost`` (:class:`Overloaded`).
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffusion_core.rng import randn
from diffusion_core.steps import ddim_step, ddpm_step, dpm_solver_step, guided_output, sampler_timesteps

log = logging.getLogger(__name__)

__all__ = ["SampleSpec", "SampleResult", "Ticket", "Engine", "EngineError", "TooCostly", "Overloaded",
           "NotReady", "Cancelled", "TimedOut", "LoopStats", "request_cost", "batch_buckets", "calibrate_pack_rows",
           "time_forward"]


# ---------------------------------------------------------------------------------------------- errors
class EngineError(RuntimeError):
    """Base of the engine's refusals; ``status`` is the HTTP code a server should answer."""

    status = 500


class TooCostly(EngineError):
    """The request alone costs more than ``max_request_cost``."""

    status = 422


class Overloaded(EngineError):
    """The queue is full (in cost); retry later."""

    status = 503


class NotReady(EngineError):
    """No model is loaded yet, or the loop is not running."""

    status = 503


class Cancelled(EngineError):
    """The request was cancelled (its client went away)."""

    status = 499


class TimedOut(EngineError):
    """The request passed its deadline (``request_timeout_s``)."""

    status = 504


# ---------------------------------------------------------------------------------------------- public types
class ServedModel(Protocol):
    """What the engine needs of a loaded model (``pipelines.model_io.DiffusionSampler`` is one)."""

    unet: torch.nn.Module
    diffusion: Any
    device: torch.device
    info: dict[str, Any]

    @property
    def channels(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    def labels_for(self, num_samples: int, class_labels: list[int] | None) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class SampleSpec:
    """One request's sampling work (validated by the caller against the model)."""

    num_samples: int
    seed: int
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    class_labels: list[int] | None = None
    preview_every: int | None = None  # emit a preview every k steps (None: none)

    @property
    def guided(self) -> bool:
        return float(self.guidance_scale) != 1.0

    @property
    def cost(self) -> int:
        return request_cost(self.num_samples, self.steps, self.guided)


def request_cost(rows: int, steps: int, guided: bool) -> int:
    """Model-row evaluations of a request: rows x steps, x2 with classifier-free guidance."""
    return int(rows) * int(steps) * (2 if guided else 1)


@dataclass
class SampleResult:
    """A finished request: images [n, C, H, W] in [-1, 1] on the CPU and how they were made."""

    images: torch.Tensor
    version: str | None  # model version that produced them
    model_info: dict[str, Any]
    batch_size: int  # the most rows in one UNet forward that included this request
    queue_ms: float  # submit -> first forward
    sample_ms: float  # first forward -> done


EventFn = Callable[[dict[str, Any]], None]


class Ticket:
    """Handle of a submitted request: ``future`` resolves to a :class:`SampleResult` (or an EngineError);
    :meth:`cancel` drops it at the next step boundary."""

    def __init__(self, spec: SampleSpec, on_event: EventFn | None, deadline: float | None) -> None:
        self.spec, self.on_event, self.deadline = spec, on_event, deadline
        self.future: Future = Future()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> SampleResult:
        return self.future.result(timeout)


def batch_buckets(max_batch_size: int) -> list[int]:
    """Fixed forward sizes for a compiled model: powers of two below the bound, and the bound."""
    b = int(max_batch_size)
    return sorted({1 << k for k in range(max(1, b).bit_length()) if (1 << k) < b} | {b})


def calibrate_pack_rows(forward_s: dict[int, float], factor: float = 2.5) -> int:
    """The largest batch b, scanning measured sizes upwards, whose forward costs at most ``factor`` x a 1-row
    forward: a short request sharing forwards of b rows steps at <= ``factor`` x its idle step time, which with
    the fixed per-request costs (HTTP, encoding) and the starved requests' occasional full forwards keeps it
    under 3x its idle latency."""
    rows = 1
    for b in sorted(forward_s):
        if forward_s[b] > factor * forward_s[min(forward_s)]:
            break
        rows = b
    return rows


# ---------------------------------------------------------------------------------------------- internals
_SCHEDSTAT = "/proc/thread-self/schedstat"


def runq_seconds() -> float:
    """Seconds this thread has been runnable but waiting for a CPU (Linux schedstat; 0 elsewhere)."""
    try:
        with open(_SCHEDSTAT, "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class LoopStats:
    """Where the loop's time goes, summed since start: wall and loop-thread CPU seconds of the UNet forwards and
    of whole iterations (pack + inputs + forward + updates). Diff two :meth:`snapshot` s to see one period:
    ``mean_rows`` < the bound means rows were missing; wall >> CPU means the loop waited: for a CPU (``runq``:
    runnable but not running, from Linux's schedstat; other processes) or for the GIL (the rest: other threads of
    this process); step - forward is the engine's own per-step overhead."""

    forwards: int = 0
    rows: int = 0
    forward_s: float = 0.0
    forward_cpu_s: float = 0.0
    step_s: float = 0.0
    step_cpu_s: float = 0.0
    step_runq_s: float = 0.0

    def forward(self, wall: float, cpu: float) -> None:
        self.forward_s += wall
        self.forward_cpu_s += cpu

    def step(self, rows: int, wall: float, cpu: float, runq: float) -> None:
        self.forwards += 1
        self.rows += rows
        self.step_s += wall
        self.step_cpu_s += cpu
        self.step_runq_s += runq

    def snapshot(self) -> dict[str, float]:
        return {"forwards": self.forwards, "rows": self.rows, "forward_s": round(self.forward_s, 4),
                "forward_cpu_s": round(self.forward_cpu_s, 4), "step_s": round(self.step_s, 4),
                "step_cpu_s": round(self.step_cpu_s, 4), "step_runq_s": round(self.step_runq_s, 4)}

    @staticmethod
    def period(before: dict[str, float], after: dict[str, float], seconds: float | None = None) -> dict[str, Any]:
        """Per-forward means between two snapshots (ms), and the loop's busy fraction of ``seconds``."""
        d = {k: after[k] - before[k] for k in after}
        f = max(1, d["forwards"])
        out = {"forwards": d["forwards"], "mean_rows": round(d["rows"] / f, 2),
               "forward_ms": round(1000 * d["forward_s"] / f, 2),
               "forward_cpu_ms": round(1000 * d["forward_cpu_s"] / f, 2),
               "overhead_ms": round(1000 * (d["step_s"] - d["forward_s"]) / f, 2),
               "overhead_cpu_ms": round(1000 * (d["step_cpu_s"] - d["forward_cpu_s"]) / f, 2),
               "step_ms": round(1000 * d["step_s"] / f, 2), "step_cpu_ms": round(1000 * d["step_cpu_s"] / f, 2),
               "step_runq_ms": round(1000 * d.get("step_runq_s", 0.0) / f, 2)}
        out["step_gil_ms"] = round(max(0.0, out["step_ms"] - out["step_cpu_ms"] - out["step_runq_ms"]), 2)
        if seconds:
            out["busy"] = round(d["step_s"] / seconds, 3)
        return out


@dataclass
class _Slot:
    """A loaded model version and its forward function (compiled or not), with the model facts the loop reads
    every step cached (a served model's properties may be costly: ``DiffusionSampler.num_classes`` copies the
    UNet config)."""

    model: ServedModel
    version: str | None
    forward: Callable[..., torch.Tensor]
    buckets: list[int] | None  # pad forwards to these sizes (compiled models), else None
    null: int = field(init=False)  # the unconditional label (= num_classes); 0 for an unconditional model
    channels: int = field(init=False)
    pack_rows: int | None = None  # calibrated by Engine.prepare when the engine has pack_ratio but no pack_rows

    def __post_init__(self) -> None:
        self.null, self.channels = int(self.model.num_classes), int(self.model.channels)

    @property
    def conditional(self) -> bool:
        return self.null > 0


def time_forward(forward: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                 kwargs: dict[str, Any] | None = None, repeats: int = 3, *, warmup: bool = True
                 ) -> tuple[float, float]:
    """Median wall and calling-thread CPU seconds of ``repeats`` calls ``forward(x, t, **kwargs)`` under no_grad,
    after one untimed warm-up unless ``warmup=False`` (CUDA synchronised around each); (0, 0) for ``repeats=0``
    (warm-up only)."""
    cuda = x.device.type == "cuda"
    walls, cpus = [], []
    with torch.no_grad():
        for i in range(int(not warmup), repeats + 1):
            if cuda:
                torch.cuda.synchronize(x.device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            forward(x, t, **(kwargs or {}))
            if cuda:
                torch.cuda.synchronize(x.device)
            if i:
                walls.append(time.perf_counter() - start)
                cpus.append(time.thread_time() - start_cpu)
    return (statistics.median(walls), statistics.median(cpus)) if walls else (0.0, 0.0)


def _time_forwards(slot: _Slot, sizes: list[int], rounds: int = 5) -> dict[int, float]:
    """Median wall seconds of a forward at each size, the sizes taking turns in every round, so a drift in the
    machine's speed falls on all of them alike (timed one size after another, the same model calibrated to 2,
    4 or 8 rows from one start to the next). Each size is warmed up once, before the first round."""
    samples: dict[int, list[float]] = {b: [] for b in sizes}
    for b in sizes:
        _time_forward(slot, b, repeats=0)
    for _ in range(rounds):
        for b in sizes:
            samples[b].append(_time_forward(slot, b, repeats=1, warmup=False))
    return {b: statistics.median(v) for b, v in samples.items()}


def _time_forward(slot: _Slot, rows: int, repeats: int, warmup: bool = True) -> float:
    """Median wall seconds of a forward of ``rows`` zero rows of the slot's model (:func:`time_forward`)."""
    m = slot.model
    x = torch.zeros(rows, slot.channels, int(m.image_size), int(m.image_size), device=m.device)
    t = torch.zeros(rows, dtype=torch.long, device=m.device)
    kw = {"y": torch.full((rows,), slot.null, dtype=torch.long, device=m.device)} if slot.conditional else {}
    return time_forward(slot.forward, x, t, kw, repeats, warmup=warmup)[0]


_seq = itertools.count()


@dataclass
class _Request:
    """An admitted request's rows and their state."""

    ticket: Ticket
    slot: _Slot
    ts: list[int]  # original step indices, strictly decreasing
    x: torch.Tensor  # [n, C, H, W] on the model's device
    g: torch.Generator
    labels: torch.Tensor | None  # [fw_rows] on the device: labels, then null labels for the guided half; None
    n: int = 0  # images
    mult: int = 1  # forward rows per image: 2 with classifier-free guidance
    seq: int = field(default_factory=lambda: next(_seq))
    pos: int = 0
    filled: int = 0  # forward rows with a model output for the current step
    out: torch.Tensor | None = None  # [fw_rows, C_out, H, W] model outputs of the current step
    prev_x0: torch.Tensor | None = None  # DPM-Solver++ history
    h_prev: torch.Tensor | None = None
    skipped: int = 0  # consecutive forwards this request was left out of
    batch_size: int = 0
    first_forward: float | None = None

    @property
    def spec(self) -> SampleSpec:
        return self.ticket.spec

    @property
    def fw_rows(self) -> int:
        return self.n * self.mult

    @property
    def remaining(self) -> int:
        return self.owed - self.filled

    @property
    def owed(self) -> int:  # cost still counted in the queue bound (released a step at a time)
        return self.fw_rows * (len(self.ts) - self.pos)


# ---------------------------------------------------------------------------------------------- the engine
class Engine:
    """The sampling loop. Thread-safe :meth:`submit` / :meth:`swap`; :meth:`start` runs the loop in a thread.

    :param max_batch_size: most rows in one UNet forward (1 = unbatched).
    :param max_request_cost: most rows x steps (x2 guided) one request may cost.
    :param max_queue_cost: most outstanding cost of all admitted requests (default 8 x max_request_cost).
    :param request_timeout_s: default deadline of a request (None: none).
    :param compile: torch.compile each model and pad forwards to :func:`batch_buckets` (no recompiles).
    :param starve_after: forwards a request may be left out of before it goes first.
    :param pack_ratio: None (fill every forward) or the cost ratio beyond which a request is *long*: costlier than
        ``pack_ratio`` x the cheapest active request.
    :param pack_rows: with ``pack_ratio``, the rows up to which long requests may fill a forward that short ones
        leave room in (1: long requests join only when starved; None: calibrated per model by :meth:`prepare`,
        the largest bucket size whose forward costs at most 2.5x a 1-row forward).
    """

    def __init__(self, *, max_batch_size: int = 16, max_request_cost: int = 16 * 1000 * 2,
                 max_queue_cost: int | None = None, request_timeout_s: float | None = None,
                 compile: bool = False, starve_after: int = 8, pack_ratio: float | None = None,
                 pack_rows: int | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = int(max_batch_size)
        self.max_request_cost = int(max_request_cost)
        self.max_queue_cost = int(max_queue_cost if max_queue_cost is not None else 8 * self.max_request_cost)
        self.request_timeout_s = request_timeout_s
        self.compile = bool(compile)
        self.starve_after = int(starve_after)
        self.pack_ratio = pack_ratio
        self.pack_rows = pack_rows
        self._lock = threading.Condition()
        self._inbox: list[Ticket] = []
        self._active: list[_Request] = []
        self._outstanding = 0  # cost of inbox + active, updated under the lock
        self._current: _Slot | None = None
        self._pending: _Slot | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = LoopStats()
        self.last_error: str | None = None
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "failed": 0}  # requests, by outcome

    # ------------------------------------------------------------------ models
    def prepare(self, model: ServedModel, version: str | None = None) -> _Slot:
        """Wrap ``model`` for the loop (call it off the loop thread: the swap itself is then instant). With
        ``compile``, compile and warm up every bucket size; with ``pack_ratio`` and no ``pack_rows``, time a
        forward at each bucket size and calibrate the slot's ``pack_rows`` (:func:`calibrate_pack_rows`)."""
        unet = model.unet.eval()
        buckets = batch_buckets(self.max_batch_size)
        forward = torch.compile(unet, dynamic=False) if self.compile else unet
        slot = _Slot(model, version, forward, buckets if self.compile else None)
        if self.compile:
            for b in buckets:  # warm-up: one compile per fixed size, none later
                _time_forward(slot, b, repeats=0)
        if self.pack_ratio is not None and self.pack_rows is None:
            costs = _time_forwards(slot, buckets)
            slot.pack_rows = calibrate_pack_rows(costs)
            log.info("engine: forward ms by rows %s -> pack_rows %d", {b: round(1000 * v, 2) for b, v in
                                                                       costs.items()}, slot.pack_rows)
        return slot

    def swap(self, model: ServedModel | _Slot, version: str | None = None) -> None:
        """Serve ``model`` for requests admitted from the next step boundary on (in-flight ones keep theirs)."""
        slot = model if isinstance(model, _Slot) else self.prepare(model, version)
        with self._lock:
            self._pending = slot
            self._lock.notify_all()

    @property
    def model(self) -> ServedModel | None:
        """The model new requests get (the pending one once swapped in)."""
        slot = self._pending or self._current
        return slot.model if slot else None

    @property
    def version(self) -> str | None:
        slot = self._pending or self._current
        return slot.version if slot else None

    # ------------------------------------------------------------------ submission
    def submit(self, spec: SampleSpec, on_event: EventFn | None = None,
               timeout_s: float | None = None) -> Ticket:
        """Queue ``spec``; raises TooCostly (over max_request_cost), Overloaded (queue full in cost) or
        NotReady (no model / loop not running). ``on_event`` gets preview dicts from the loop thread."""
        cost = spec.cost
        if cost > self.max_request_cost:
            raise TooCostly(f"request cost num_samples x steps{' x 2 (guidance)' if spec.guided else ''} = "
                            f"{cost} exceeds serve.max_request_cost={self.max_request_cost}")
        timeout_s = self.request_timeout_s if timeout_s is None else timeout_s
        deadline = time.perf_counter() + timeout_s if timeout_s else None
        ticket = Ticket(spec, on_event, deadline)
        with self._lock:
            if self.model is None or self._dead:
                raise NotReady("no model loaded yet" if self.model is None else "the sampling loop is not running")
            if self._outstanding + cost > self.max_queue_cost:
                raise Overloaded(f"queue full: {self._outstanding} of {self.max_queue_cost} cost units in flight")
            self._outstanding += cost
            self._inbox.append(ticket)
            self._lock.notify_all()
        return ticket

    @property
    def forwards(self) -> int:
        """UNet forwards run (for benchmarks and tests)."""
        return self.stats.forwards

    @property
    def rows(self) -> int:
        """Real rows in those forwards."""
        return self.stats.rows

    @property
    def packing(self) -> tuple[float | None, int | None]:
        """(pack_ratio, pack_rows) that new requests get: pack_rows as set, else as calibrated for the model."""
        slot = self._pending or self._current
        return self.pack_ratio, self.pack_rows or (slot.pack_rows if slot else None)

    def health(self) -> dict[str, Any]:
        """Live state: loop alive, model loaded (and version), active requests, queued cost."""
        with self._lock:
            pack_ratio, pack_rows = self.packing
            return {"loop_alive": self.alive, "model_loaded": self.model is not None, "version": self.version,
                    "active_requests": len(self._active) + len(self._inbox), "queued_cost": self._outstanding,
                    "max_queue_cost": self.max_queue_cost, "pack_ratio": pack_ratio, "pack_rows": pack_rows,
                    "last_error": self.last_error, **self.counts,
                    "stats": self.stats.snapshot()}

    # ------------------------------------------------------------------ loop control
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def _dead(self) -> bool:  # started and gone (a loop never started is driven by hand with step())
        return self._stop or (self._thread is not None and not self._thread.is_alive())

    def start(self) -> Engine:
        """Run the loop in a daemon thread."""
        if not self.alive:
            self._stop = False
            self._thread = threading.Thread(target=self.run, name="sampling-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still queued fail with NotReady."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """The loop: boundary, forward, updates; sleeps while there is nothing to do."""
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._inbox and not self._active and self._pending is None:
                        self._lock.wait(timeout=1.0)
                    if self._stop:
                        break
                self.step()
        finally:
            self._fail_all(NotReady("the sampling loop stopped"))

    def step(self) -> None:
        """One step boundary and one forward (public so tests can drive the loop by hand)."""
        self._boundary()
        if self._active:
            self._forward_and_update()

    # ------------------------------------------------------------------ step boundary
    def _boundary(self) -> None:
        with self._lock:
            if self._pending is not None:
                self._current, self._pending = self._pending, None
                log.info("engine: now serving model version %s", self._current.version)
            inbox, self._inbox = self._inbox, []
        for ticket in inbox:
            self._admit(ticket)
        now = time.perf_counter()
        for req in list(self._active):
            t = req.ticket
            if t.cancelled.is_set():
                self._finish(req, error=Cancelled("cancelled"))
            elif t.deadline is not None and now > t.deadline:
                self._finish(req, error=TimedOut(f"not done within request_timeout_s "
                                                 f"({t.deadline - t.submitted:.1f} s)"))

    def _admit(self, ticket: Ticket) -> None:
        spec, slot = ticket.spec, self._current
        if ticket.cancelled.is_set():
            return self._release(ticket, spec.cost, Cancelled("cancelled"))
        try:
            m = slot.model
            ts = sampler_timesteps(m.diffusion, spec.sampler, spec.steps)
            labels = m.labels_for(spec.num_samples, spec.class_labels)
            if spec.guided and labels is None:
                raise ValueError("classifier-free guidance needs a class-conditional model (guidance_scale=1)")
            g = torch.Generator().manual_seed(int(spec.seed))
            shape = (spec.num_samples, int(m.channels), int(m.image_size), int(m.image_size))
            # x_T first, drawn as diffusion_core's loops do (GaussianDiffusion._initial)
            x = randn(shape, generator=[g] * spec.num_samples, device=m.device, dtype=torch.float32)
        except Exception as e:  # a bound the caller's validation missed: fail this request only
            return self._release(ticket, spec.cost, EngineError(f"{type(e).__name__}: {e}"))
        mult = 2 if spec.guided else 1
        if labels is not None:  # forward rows: conditional rows, then (guided) the same images' null-label rows
            labels = labels.to(m.device)
            labels = torch.cat([labels, torch.full_like(labels, slot.null)]) if mult == 2 else labels
        self._active.append(_Request(ticket=ticket, slot=slot, ts=ts, x=x, g=g, labels=labels,
                                     n=spec.num_samples, mult=mult))

    # ------------------------------------------------------------------ packing
    def _order(self) -> list[_Request]:
        """Fairness: starved requests first, then least remaining work, then arrival."""
        return sorted(self._active, key=lambda r: (r.skipped < self.starve_after, r.remaining, r.seq))

    def _pack(self) -> tuple[_Slot, list[tuple[_Request, int, int]]]:
        """Choose (request, first forward row, rows) chunks for one forward of one model version.

        In fairness order; with ``pack_ratio`` a request is *long* when its cost exceeds ``pack_ratio`` times the
        cheapest active request's. Short and starved requests fill the forward up to ``max_batch_size``; a long,
        not starved one only while the forward has fewer than ``pack_rows`` rows (the engine's, else the
        model's calibrated one, else 1)."""
        order = self._order()
        slot, room, used, chunks = order[0].slot, self.max_batch_size, 0, []
        mine = [r for r in order if r.slot is slot]
        cap = self.max_batch_size
        if self.pack_ratio is not None:
            cheapest = min(r.spec.cost for r in mine)
            long_cost = self.pack_ratio * cheapest
            cap = self.pack_rows or slot.pack_rows or 1
        for req in mine:
            if room == 0:
                break
            need = req.fw_rows - req.filled
            if self.pack_ratio is not None and req.spec.cost > long_cost and req.skipped < self.starve_after:
                need = min(need, max(0, cap - used))  # a long request fills only up to pack_rows
            k = min(room, need)
            if k:
                chunks.append((req, req.filled, k))
                room, used = room - k, used + k
        return slot, chunks

    def _inputs(self, slot: _Slot, chunks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stack the chunks' x, per-row t and labels (guided requests: cond rows, then null-label rows). A chunk
        is a slice of its request's forward rows, so it costs one view, not a gather; t is built from a list."""
        xs, ts, ys = [], [], []
        for req, start, k in chunks:
            x = req.x if req.mult == 1 else torch.cat([req.x, req.x])  # both halves of a guided request see x
            xs.append(x if (start, k) == (0, x.shape[0]) else x[start:start + k])
            ts.extend([req.ts[req.pos]] * k)
            if slot.conditional:
                ys.append(req.labels[start:start + k])
        device = slot.model.device
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        t = torch.tensor(ts, dtype=torch.long, device=device)
        y = (ys[0] if len(ys) == 1 else torch.cat(ys)) if ys else None
        if slot.buckets is not None:  # pad to a fixed size: a compiled model never sees a new shape
            size = next(b for b in slot.buckets if b >= x.shape[0])
            pad = size - x.shape[0]
            if pad:
                x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
                t = torch.cat([t, t.new_zeros(pad)])
                y = None if y is None else torch.cat([y, y.new_full((pad,), slot.null)])
        return x, t, y

    def _forward_and_update(self) -> None:
        clock, cpu, runq = time.perf_counter(), time.thread_time(), runq_seconds()
        slot, chunks = self._pack()
        real = sum(k for _, _, k in chunks)
        try:
            x, t, y = self._inputs(slot, chunks)
            f_clock, f_cpu = time.perf_counter(), time.thread_time()
            with torch.no_grad():
                out = slot.forward(x, t, y=y) if y is not None else slot.forward(x, t)
            self.stats.forward(time.perf_counter() - f_clock, time.thread_time() - f_cpu)
        except Exception as e:  # a model fault fails the requests of this forward only
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception("engine: forward failed")
            for req, _, _ in chunks:
                self._finish(req, error=EngineError(self.last_error))
            return
        now = time.perf_counter()
        included = {id(r) for r, _, _ in chunks}
        for req in self._active:
            req.skipped = 0 if id(req) in included else req.skipped + 1
        i = 0
        for req, start, k in chunks:
            if k == req.fw_rows:  # the whole step in this forward (the common case): a view, no copy
                req.out = out[i:i + k]
            else:
                if req.out is None:
                    req.out = out.new_empty(req.fw_rows, *out.shape[1:])
                req.out[start:start + k] = out[i:i + k]
            i += k
            req.filled += k
            req.batch_size = max(req.batch_size, real)
            req.first_forward = req.first_forward or now
        ready = [req for req, _, _ in chunks if req.filled == req.fw_rows]
        groups: dict[tuple[int, str], list[_Request]] = {}
        for req in ready:  # one vectorised update per (model, sampler): rows keep their own t, eta, history
            groups.setdefault((id(req.slot), req.spec.sampler), []).append(req)
        for group in groups.values():
            try:
                x0s = self._update(group)
            except Exception as e:  # fails this group's requests only
                log.exception("engine: update failed")
                for req in group:
                    self._finish(req, error=EngineError(f"{type(e).__name__}: {e}"))
                continue
            for req, x0 in zip(group, x0s, strict=True):
                self._advanced(req, x0)
        self.stats.step(real, time.perf_counter() - clock, time.thread_time() - cpu, runq_seconds() - runq)

    # ------------------------------------------------------------------ per-request update
    def _update(self, group: list[_Request]) -> list[torch.Tensor]:
        """Each request's own step t -> t_prev from its model outputs (diffusion_core.steps), for the requests of
        one model and sampler stacked row-wise into ONE call of the step function; returns each request's x0.

        Per-row scalars (t, t_prev, eta, DPM-Solver++ order) are gathered as Python lists and become one tensor
        each; only the noise is drawn per request (from its own generator, so batch-mates never shift it)."""
        slot, sampler = group[0].slot, group[0].spec.sampler
        t, t_prev, eta, second, outs, noise, draws_any = [], [], [], [], [], [], False
        for req in group:
            n, out, last = req.n, req.out, req.pos == len(req.ts) - 1
            if req.mult == 2:  # classifier-free guidance on the eps channels
                out = guided_output(out[:n], out[n:], float(req.spec.guidance_scale), slot.channels)
            outs.append(out)
            t.extend([req.ts[req.pos]] * n)
            t_prev.extend([-1 if last else req.ts[req.pos + 1]] * n)
            # noise drawn per row from the request's own generator, rows in order, exactly when the core loops
            # draw it (every ddpm step but the last, every ddim step with eta > 0); zeros where it is unused
            draws = (sampler == "ddpm" and not last) or (sampler == "ddim" and req.spec.eta != 0)
            draws_any |= draws
            noise.append(randn(req.x.shape, generator=[req.g] * n, device=req.x.device, dtype=req.x.dtype)
                         if draws else None)
            eta.extend([float(req.spec.eta)] * n)
            # DPM-Solver++(2M) with lower_order_final, as samplers.dpm_solver_sample_progressive
            second.extend([req.prev_x0 is not None and req.pos != len(req.ts) - 2] * n)
        cat = (lambda xs: xs[0]) if len(group) == 1 else torch.cat
        x, out = cat([r.x for r in group]), cat(outs)
        t, t_prev = torch.tensor(t, dtype=torch.long), torch.tensor(t_prev, dtype=torch.long)
        noise = cat([z if z is not None else torch.zeros_like(r.x) for z, r in zip(noise, group, strict=True)]) \
            if draws_any else None
        d, sizes = slot.model.diffusion, [r.n for r in group]
        if sampler == "ddpm":
            x, x0 = ddpm_step(d, x, t, t_prev, out, noise)
        elif sampler == "ddim":
            x, x0 = ddim_step(d, x, t, t_prev, out, torch.tensor(eta, dtype=torch.float64), noise)
        else:
            prev = cat([r.prev_x0 if r.prev_x0 is not None else torch.zeros_like(r.x) for r in group])
            h_prev = cat([r.h_prev if r.h_prev is not None else torch.full((r.n,), math.nan, dtype=torch.float64)
                          for r in group])
            x, x0, h = dpm_solver_step(d, x, t, t_prev, out, prev, h_prev, torch.tensor(second))
            for req, x0_r, h_r in zip(group, x0.split(sizes), h.split(sizes), strict=True):
                req.prev_x0, req.h_prev = x0_r, h_r
        for req, x_r in zip(group, x.split(sizes), strict=True):
            req.x = x_r
        return list(x0.split(sizes))

    def _advanced(self, req: _Request, x0: torch.Tensor) -> None:
        """Bookkeeping after a request's step: position, queue cost, previews, done."""
        req.pos += 1
        req.filled = 0
        req.out = None
        with self._lock:
            self._outstanding -= req.fw_rows
        k = req.spec.preview_every
        if k and req.pos % k == 0 and req.pos < len(req.ts) and req.ticket.on_event is not None:
            self._emit(req, {"event": "preview", "step": req.pos, "total": len(req.ts),
                             "images": x0.detach().to("cpu")})
        if req.pos == len(req.ts):
            self._finish(req)

    def _emit(self, req: _Request, event: dict[str, Any]) -> None:
        try:
            req.ticket.on_event(event)
        except Exception:  # a consumer's fault never stops the loop
            log.exception("engine: event callback failed")

    # ------------------------------------------------------------------ leaving
    def _finish(self, req: _Request, error: Exception | None = None) -> None:
        if req in self._active:
            self._active.remove(req)
        if error is not None:
            return self._release(req.ticket, req.owed, error)
        end = time.perf_counter()
        start = req.first_forward or end
        result = SampleResult(images=req.x.detach().to("cpu"), version=req.slot.version,
                              model_info=dict(req.slot.model.info or {}), batch_size=req.batch_size,
                              queue_ms=(start - req.ticket.submitted) * 1000, sample_ms=(end - start) * 1000)
        self.counts["completed"] += 1
        if not req.ticket.future.done():
            req.ticket.future.set_result(result)

    def _release(self, ticket: Ticket, cost: int, error: Exception) -> None:
        kind = {Cancelled: "cancelled", TimedOut: "timed_out"}.get(type(error), "failed")
        with self._lock:
            self._outstanding -= cost
            self.counts[kind] += 1
        if not ticket.future.done():
            ticket.future.set_exception(error)

    def _fail_all(self, error: Exception) -> None:
        for req in list(self._active):
            self._finish(req, error=error)
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for ticket in inbox:
            self._release(ticket, ticket.spec.cost, error)
