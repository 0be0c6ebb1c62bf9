"""Everything a training rank must keep to resume exactly (``TrainState``), its checkpoint files, and the
validation that makes a resume fall back past a torn checkpoint.

A checkpoint directory holds, from rank 0, ``model.safetensors``, ``ema_<i>.safetensors``, ``state.pt``
(optimizer, LR schedule, grad scaler, step, timestep-sampler state, data seed, a bounded loss summary) and the
``ema_model/`` registered-model directory; from every rank ``rng_rank<r>.pt`` (CPU and CUDA generator states)
and ``rank<r>.json`` (what the rank did); and last, from every rank, ``manifest_rank<r>.json`` listing the size
and SHA-256 of each file that rank wrote. A checkpoint is valid when every manifest of its world is present and
every listed file matches it.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffusion_core import LossSecondMomentResampler, ScheduleSampler

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
_CKPT_NAME = re.compile(r"^checkpoint_(\d+)(?:_(\d+))?$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: a file is missing, torn, or does not load."""


# ----------------------------------------------------------------------------------------------------------
# losses


@dataclass
class LossSummary:
    """Bounded record of the training loss: count and sum of every step, and the last ``keep`` (step, loss)."""

    count: int = 0
    total: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=256))

    def add(self, step: int, loss: float) -> None:
        self.count += 1
        self.total += loss
        self.recent.append((step, loss))

    @property
    def last(self) -> float | None:
        return self.recent[-1][1] if self.recent else None

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "total": self.total, "recent": [list(r) for r in self.recent],
                "keep": self.recent.maxlen}

    @classmethod
    def from_state(cls, st: dict[str, Any]) -> LossSummary:
        recent = deque(((int(s), float(v)) for s, v in st["recent"]), maxlen=int(st["keep"]))
        return cls(count=int(st["count"]), total=float(st["total"]), recent=recent)


class LossWindow:
    """Sums over one logging window: mean loss, mean loss per quarter of [0, T), steps and wall time."""

    def __init__(self, num_timesteps: int, clock: Callable[[], float]) -> None:
        self.T, self.clock = num_timesteps, clock
        self._reset()

    def _reset(self) -> None:
        self.loss, self.steps, self.t0 = 0.0, 0, self.clock()
        self.q_sum = torch.zeros(4, dtype=torch.float64)
        self.q_n = torch.zeros(4, dtype=torch.float64)

    def add(self, loss: float, t: torch.Tensor, per_example: torch.Tensor) -> None:
        """One optimizer step: its (weighted) loss, and each example's loss at its timestep."""
        self.loss += loss
        self.steps += 1
        quarter = (t.detach().cpu() * 4 // self.T).clamp(max=3)
        self.q_sum += torch.bincount(quarter, weights=per_example.detach().double().cpu(), minlength=4)
        self.q_n += torch.bincount(quarter, minlength=4).double()

    def flush(self) -> dict[str, float]:
        """The window's metrics (``loss``, ``loss_q0``..``loss_q3`` where seen, ``steps``, ``seconds``); resets."""
        out = {"loss": self.loss / max(self.steps, 1), "steps": float(self.steps),
               "seconds": max(self.clock() - self.t0, 1e-9)}
        for q in range(4):
            if self.q_n[q] > 0:
                out[f"loss_q{q}"] = float(self.q_sum[q] / self.q_n[q])
        self._reset()
        return out


# ----------------------------------------------------------------------------------------------------------
# per-rank random state


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed, distinct for every (run seed, rank, start step) (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint64)[0] >> 1)


def seed_rank(seed: int, rank: int, step: int) -> None:
    """Seed this process's CPU and CUDA generators for ``rank`` starting at ``step``."""
    torch.manual_seed(rank_seed(seed, rank, step))  # also seeds every CUDA device


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's CPU generator state and, on CUDA, the device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(st: dict[str, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and st.get("cuda") is not None:
        torch.cuda.set_rng_state(st["cuda"], device)


def noise_probe(device: torch.device, n: int = 4) -> list[float]:
    """The first ``n`` values the next ``randn`` on ``device`` will draw, without consuming them."""
    g = torch.Generator(device=device)
    g.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    return torch.randn(n, generator=g, device=device).cpu().tolist()


# ----------------------------------------------------------------------------------------------------------
# the state


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    # Linear warm-up to the base learning rate (Goyal et al. 2017), then constant as in DDPM.
    return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0


def make_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    """AdamW with the configured rate and decay; fused (or foreach) where torch has it for the device."""
    from diffusion_core.models import optimizer_kwargs

    params = list(params)
    device = params[0].device if params else torch.device("cpu")
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                             **optimizer_kwargs(device))


@dataclass
class TrainState:
    """Model, EMAs, optimizer, LR schedule, grad scaler, timestep sampler, step counters, data seed and a loss
    summary: what :meth:`save` writes and :meth:`load` restores, so training continues as if never stopped."""

    model: torch.nn.Module  # the raw (unwrapped) network
    emas: list[AveragedModel]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    timestep_sampler: ScheduleSampler
    step: int = 0
    nonfinite: int = 0
    data_seed: int = 0
    losses: LossSummary = field(default_factory=LossSummary)

    @classmethod
    def create(cls, model: torch.nn.Module, timestep_sampler: ScheduleSampler, train_cfg, *,
               device: torch.device, fp16: bool = False) -> TrainState:
        """A fresh state for ``model`` (already on ``device``) under a TrainConfig."""
        emas = [AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)
                for d in train_cfg.ema_decays]
        opt = make_optimizer(model.parameters(), train_cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(train_cfg.warmup_steps))
        scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        return cls(model=model, emas=emas, optimizer=opt, scheduler=sched, scaler=scaler,
                   timestep_sampler=timestep_sampler)

    # -- save and load, side by side ------------------------------------------------------------------
    def save(self, directory: str | Path, *, rank: int = 0, world_size: int = 1,
             device: torch.device = torch.device("cpu"), extra: dict[str, Any] | None = None) -> None:
        """Write this rank's part of a checkpoint into ``directory``, its manifest last. Rank 0 writes the shared
        state; every rank writes its generator states and ``extra`` (as ``rank<r>.json``)."""
        from pipelines.model_io import save_weights

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(device), d / f"rng_rank{rank}.pt")
        (d / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world_size, **(extra or {})}))
        if rank == 0:
            save_weights(self.model.state_dict(), d / MODEL_FILE)
            for i, ema in enumerate(self.emas):
                save_weights(ema.state_dict(), d / f"ema_{i}.safetensors")
            sampler = self.timestep_sampler
            torch.save({
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "nonfinite": self.nonfinite,
                "data_seed": self.data_seed, "losses": self.losses.state_dict(),
                "timestep_sampler": sampler.state_dict() if isinstance(sampler, LossSecondMomentResampler) else None,
            }, d / STATE_FILE)
        write_manifest(d, rank=rank, world_size=world_size, step=self.step)

    def load(self, directory: str | Path, *, rank: int = 0, device: torch.device = torch.device("cpu")) -> bool:
        """Validate the checkpoint in ``directory`` and restore from it; CheckpointError (naming the file and the
        reason) when it is torn or does not load. Returns whether this rank's generator states were in it."""
        d = Path(directory)
        problems = validate_checkpoint(d)
        if problems:
            raise CheckpointError("; ".join(problems))
        try:
            model = load_file(str(d / MODEL_FILE))
            emas = [load_file(str(d / f"ema_{i}.safetensors")) for i in range(len(self.emas))]
            st = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
            rng_file = d / f"rng_rank{rank}.pt"
            rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
            self.model.load_state_dict(model)
            for ema, sd in zip(self.emas, emas, strict=True):
                ema.load_state_dict(sd)
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
            self.scaler.load_state_dict(st["scaler"])
            if isinstance(self.timestep_sampler, LossSecondMomentResampler) and st["timestep_sampler"] is not None:
                self.timestep_sampler.load_state_dict(st["timestep_sampler"])
        except Exception as e:  # a file that passed its checksum but does not fit this run
            raise CheckpointError(f"{d.name} does not load: {type(e).__name__}: {e}") from e
        self.step, self.nonfinite = int(st["step"]), int(st["nonfinite"])
        self.data_seed, self.losses = int(st["data_seed"]), LossSummary.from_state(st["losses"])
        if rng is not None:
            set_rng_state(rng, device)
        return rng is not None


# ----------------------------------------------------------------------------------------------------------
# manifests and validation


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, *, rank: int, world_size: int, step: int) -> None:
    """``manifest_rank<r>.json``: size and SHA-256 of every file in ``directory`` (this rank's part)."""
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.startswith("manifest_rank")}
    (directory / f"manifest_rank{rank}.json").write_text(
        json.dumps({"rank": rank, "world_size": world_size, "step": step, "files": files}, sort_keys=True))


def _read_manifest(d: Path, rank: int) -> dict[str, Any]:
    path = d / f"manifest_rank{rank}.json"
    if not path.is_file():
        raise CheckpointError(f"{d.name}/{path.name} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d.name}/{path.name} is unreadable ({e})") from None


def validate_checkpoint(directory: str | Path) -> list[str]:
    """Every problem of a checkpoint directory (empty when every rank's manifest is there and matches)."""
    d = Path(directory)
    try:
        world = int(_read_manifest(d, 0)["world_size"])
        manifests = [_read_manifest(d, r) for r in range(world)]
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for m in manifests:
        for rel, want in m["files"].items():
            p = d / rel
            if not p.is_file():
                problems.append(f"{d.name}/{rel} is missing")
            elif p.stat().st_size != want["size"]:
                problems.append(f"{d.name}/{rel} is torn: {p.stat().st_size} of {want['size']} bytes")
            elif _sha256(p) != want["sha256"]:
                problems.append(f"{d.name}/{rel} does not match its SHA-256")
    return problems


# ----------------------------------------------------------------------------------------------------------
# choosing the checkpoint to resume from


def checkpoint_key(name: str) -> tuple[int, int] | None:
    """``checkpoint_00000040`` -> (40, 0), ``checkpoint_00000040_1`` -> (40, 1); None for other names."""
    m = _CKPT_NAME.match(name)
    return (int(m[1]), int(m[2] or 0)) if m else None


def checkpoint_name(step: int, taken: set[str]) -> str:
    """The directory name for a checkpoint at ``step`` that differs from every name in ``taken``."""
    name, i = f"checkpoint_{step:08d}", 0
    while name in taken:
        i += 1
        name = f"checkpoint_{step:08d}_{i}"
    return name


def stored_checkpoints(filesystem, parent: str) -> list:
    """The Ray Train checkpoints (``checkpoint_<step>[_<n>]`` directories) in ``parent``, newest first."""
    import pyarrow.fs
    import ray.train

    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(parent.rstrip("/"), allow_not_found=True))
    found = sorted((checkpoint_key(i.base_name), i.path) for i in infos
                   if i.type == pyarrow.fs.FileType.Directory and checkpoint_key(i.base_name) is not None)
    return [ray.train.Checkpoint(path=p, filesystem=filesystem) for _, p in reversed(found)]


@dataclass
class Resumed:
    name: str  # the checkpoint the state came from
    skipped: list[str]  # newer checkpoints that were unusable (their names are not reused)
    had_rng: bool


@contextmanager
def _local(checkpoint, rank: int) -> Iterator[Path]:
    """The checkpoint as a local directory: its own path on a local filesystem, else a download private to this
    process. Not ``as_directory()``: there the ranks of one node share one download directory, and a rank that
    arrives after the first download finished downloads again into it, truncating the files another rank has
    memory-mapped (safetensors), which kills that rank with SIGBUS (seen in Ray 2.60 with S3 checkpoints)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix=f"ckpt-rank{rank}-") as tmp:
        yield Path(checkpoint.to_directory(tmp))


def _parent_and_name(checkpoint) -> tuple[str, str]:
    """(run directory, checkpoint directory name) of a Ray Train checkpoint's path."""
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    return parent, name


def restore_latest(state: TrainState, checkpoint, *, rank: int, device: torch.device,
                   log: Callable[[str], None] = print, storage: tuple[Any, str] | None = None) -> Resumed | None:
    """Load ``state`` from the newest valid checkpoint of the run, falling back past torn ones (saying which and
    why). The candidates are every checkpoint in the run's directory, ``storage`` = (filesystem, path), else the
    directory of Ray Train's latest ``checkpoint``: a checkpoint uploaded just before a node was lost may be newer
    than the one Ray's controller had registered (it polls), and the run goes on from it.

    None when there is none (or Ray reported none and none stored is usable: a fresh start); a CheckpointError
    when Ray reported one and every candidate is unusable. Each rank reaches the same choice from the same files.
    """
    reported = _parent_and_name(checkpoint) if checkpoint is not None else None
    if storage is None and reported is not None:
        storage = (checkpoint.filesystem, reported[0])
    candidates = stored_checkpoints(*storage) if storage is not None else []
    if reported is not None and reported not in {_parent_and_name(c) for c in candidates}:
        candidates.insert(0, checkpoint)  # Ray's own, wherever it is
    reported_name = reported[1] if reported is not None else None
    skipped: list[str] = []
    for candidate in candidates:
        name = _parent_and_name(candidate)[1]
        try:
            with _local(candidate, rank) as d:
                had_rng = state.load(d, rank=rank, device=device)
        except CheckpointError as e:
            log(f"[train] checkpoint {name} is unusable ({e}); falling back to the previous one")
            skipped.append(name)
            continue
        if reported_name is None or (checkpoint_key(reported_name) or (-1, 0)) < (checkpoint_key(name) or (-1, 0)):
            log(f"[train] resuming from {name}, newer than the checkpoint Ray Train reported ({reported_name})")
        return Resumed(name=name, skipped=skipped, had_rng=had_rng)
    if checkpoint is None:
        return None
    raise CheckpointError(f"no usable checkpoint next to {checkpoint.path} (unusable: {', '.join(skipped)}); "
                          "move the run directory away to start afresh")
