"""TrainState save/load round trip (training continues bit-exactly), checkpoint validation and fallback,
per-rank seeding, and the loss window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusion_core.models import UNet
from pipelines.config import DiffusionConfig, TrainConfig
from pipelines.model_io import build_diffusion, build_timestep_sampler
from pipelines.train_state import (
    CheckpointError,
    LossWindow,
    TrainState,
    checkpoint_name,
    noise_probe,
    rank_seed,
    restore_latest,
    seed_rank,
    validate_checkpoint,
)

CPU = torch.device("cpu")
TC = TrainConfig(ema_decays=[0.9, 0.99], warmup_steps=3, lr=1e-3, weight_decay=0.01)


def _state(seed: int, sampler: str = "loss-second-moment"):
    torch.manual_seed(seed)
    unet = UNet(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(), image_size=8, norm_groups=8, dropout=0.1)
    diffusion = build_diffusion(DiffusionConfig(diffusion_steps=50, timestep_sampler=sampler))
    return TrainState.create(unet, build_timestep_sampler(DiffusionConfig(timestep_sampler=sampler), diffusion),
                             TC, device=CPU), diffusion


def _train(state: TrainState, diffusion, steps: int) -> None:
    """The worker loop's update, reduced to its state changes (data and noise from the global generator)."""
    for _ in range(steps):
        x = torch.rand(4, 1, 8, 8) * 2 - 1
        t, w = state.timestep_sampler.sample(4, CPU)
        per_example = diffusion.training_losses(state.model, x, t)["loss"]
        loss = (per_example * w).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        for ema in state.emas:
            ema.update_parameters(state.model)
        state.timestep_sampler.update_with_local_losses(t, per_example.detach())
        state.step += 1
        state.losses.add(state.step, loss.item())


def _params(state: TrainState) -> list[torch.Tensor]:
    return [p.detach().clone() for p in state.model.parameters()]


def test_round_trip_restores_everything_and_training_continues_identically(tmp_path):
    a, diffusion = _state(0)
    _train(a, diffusion, 6)  # 24 (t, loss) pairs enter the loss-second-moment history
    a.nonfinite, a.data_seed = 2, 1234
    a.save(tmp_path, extra={"note": "x"})
    b, _ = _state(1)  # different initial weights
    assert not torch.equal(_params(a)[0], _params(b)[0])
    assert b.load(tmp_path) is True  # this rank's generator states were in the checkpoint

    assert (b.step, b.nonfinite, b.data_seed) == (6, 2, 1234)
    assert b.losses.state_dict() == a.losses.state_dict() and b.losses.count == 6
    assert b.scheduler.state_dict() == a.scheduler.state_dict()
    for ea, eb in zip(a.emas, b.emas, strict=True):
        for (ka, va), (kb, vb) in zip(ea.state_dict().items(), eb.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)
    sa, sb = a.timestep_sampler.state_dict(), b.timestep_sampler.state_dict()
    assert torch.equal(sa["loss_history"], sb["loss_history"]) and torch.equal(sa["loss_counts"], sb["loss_counts"])
    # continuing: the same data, noise, dropout and Adam moments give bit-identical weights
    rng = torch.get_rng_state()
    _train(a, diffusion, 3)
    torch.set_rng_state(rng)  # what b restored from the checkpoint is the generator state at save time
    b.load(tmp_path)
    _train(b, diffusion, 3)
    for pa, pb in zip(_params(a), _params(b), strict=True):
        assert torch.equal(pa, pb)
    assert json.loads((tmp_path / "rank0.json").read_text())["note"] == "x"


def test_loss_summary_is_bounded(tmp_path):
    a, diffusion = _state(0, sampler="uniform")
    for s in range(1, 1001):
        a.losses.add(s, float(s))
    assert len(a.losses.recent) == 256 and a.losses.count == 1000 and a.losses.last == 1000.0
    a.save(tmp_path)
    b, _ = _state(0, sampler="uniform")
    b.load(tmp_path)
    assert b.losses.total == sum(range(1, 1001)) and list(b.losses.recent)[0] == (745, 745.0)


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("victim", ["model.safetensors", "state.pt", "ema_1.safetensors", "rng_rank0.pt",
                                    "ema_model/weights.safetensors", "manifest_rank0.json"])
def test_a_torn_file_is_named(tmp_path, victim):
    a, _ = _state(0)
    (tmp_path / "ema_model").mkdir()
    (tmp_path / "ema_model" / "weights.safetensors").write_bytes(b"w" * 100)
    a.save(tmp_path)
    assert validate_checkpoint(tmp_path) == []
    _cut(tmp_path / victim)
    problems = validate_checkpoint(tmp_path)
    assert problems and victim.split("/")[-1] in " ".join(problems)
    with pytest.raises(CheckpointError, match=victim.split("/")[-1]):
        _state(1)[0].load(tmp_path)


def test_same_size_corruption_and_a_missing_rank_are_found(tmp_path):
    a, _ = _state(0)
    a.save(tmp_path, rank=0, world_size=2)
    assert validate_checkpoint(tmp_path) == [f"{tmp_path.name}/manifest_rank1.json is missing"]
    a.save(tmp_path / "rank1", rank=1, world_size=2)  # each rank writes its own directory; Ray merges them
    for f in (tmp_path / "rank1").iterdir():
        f.rename(tmp_path / f.name)
    (tmp_path / "rank1").rmdir()
    assert validate_checkpoint(tmp_path) == []
    p = tmp_path / "state.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    assert validate_checkpoint(tmp_path) == [f"{tmp_path.name}/state.pt does not match its SHA-256"]


def test_resume_falls_back_past_a_torn_newest_checkpoint(tmp_path):
    from ray.train import Checkpoint

    a, diffusion = _state(0)
    _train(a, diffusion, 2)
    a.save(tmp_path / "checkpoint_00000002")
    _train(a, diffusion, 2)
    a.save(tmp_path / "checkpoint_00000004")
    _cut(tmp_path / "checkpoint_00000004" / "model.safetensors")
    (tmp_path / "not_a_checkpoint").mkdir()
    b, _ = _state(1)
    said: list[str] = []
    resumed = restore_latest(b, Checkpoint(str(tmp_path / "checkpoint_00000004")), rank=0, device=CPU,
                             log=said.append)
    assert resumed.name == "checkpoint_00000002" and resumed.skipped == ["checkpoint_00000004"] and b.step == 2
    assert len(said) == 1 and "checkpoint_00000004" in said[0] and "model.safetensors is torn" in said[0]
    # the next checkpoint at step 4 does not reuse the torn one's directory
    assert checkpoint_name(4, set(resumed.skipped)) == "checkpoint_00000004_1"
    assert checkpoint_name(6, set(resumed.skipped)) == "checkpoint_00000006"
    _cut(tmp_path / "checkpoint_00000002" / "state.pt")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        restore_latest(b, Checkpoint(str(tmp_path / "checkpoint_00000004")), rank=0, device=CPU, log=said.append)


def test_every_rank_and_every_start_draws_its_own_noise():
    seeds = {rank_seed(0, r, s) for r in range(8) for s in (0, 100, 200)}
    assert len(seeds) == 24 and all(0 <= x < 2**63 for x in seeds)
    draws = []
    for rank in (0, 1):
        seed_rank(0, rank, 40)
        probe = noise_probe(CPU)
        assert probe == torch.randn(4).tolist()  # the probe is what the next draw gives
        draws.append(probe)
    assert draws[0] != draws[1]


def test_a_rank_missing_from_the_checkpoint_says_so(tmp_path):
    a, _ = _state(0)
    a.save(tmp_path, rank=0, world_size=1)
    assert _state(1)[0].load(tmp_path, rank=1) is False  # the worker then seeds that rank afresh


def test_loss_window_means_per_quarter_of_T():
    now = iter([0.0, 10.0, 10.0])
    w = LossWindow(100, lambda: next(now))
    w.add(1.0, torch.tensor([0, 30, 99]), torch.tensor([1.0, 2.0, 3.0]))
    w.add(3.0, torch.tensor([10, 60]), torch.tensor([5.0, 7.0]))
    out = w.flush()
    assert out == {"loss": 2.0, "steps": 2.0, "seconds": 10.0, "loss_q0": 3.0, "loss_q1": 2.0, "loss_q2": 7.0,
                   "loss_q3": 3.0}
    assert w.steps == 0 and w.t0 == 10.0


def test_the_cuda_generator_state_is_saved_and_restored_per_rank(tmp_path, monkeypatch):
    # no GPU here: the CUDA generator calls are stood in for, to see that each rank's device state travels
    cuda0 = torch.device("cuda", 0)
    states = {1: torch.tensor([1, 2, 3], dtype=torch.uint8), 0: torch.tensor([9, 9], dtype=torch.uint8)}
    restored: list[tuple[torch.Tensor, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[current])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, device: restored.append((st, device)))
    a, _ = _state(0)
    for current in (0, 1):
        a.save(tmp_path / f"r{current}", rank=current, world_size=2, device=cuda0)
    for current in (0, 1):  # merge the two ranks' parts as Ray does
        for f in (tmp_path / f"r{current}").iterdir():
            f.rename(tmp_path / f.name)
    for rank in (0, 1):
        assert _state(1)[0].load(tmp_path, rank=rank, device=cuda0) is True
    assert [(s.tolist(), d) for s, d in restored] == [([9, 9], cuda0), ([1, 2, 3], cuda0)]


def test_each_rank_restores_a_remote_checkpoint_from_its_own_download(tmp_path):
    """A checkpoint on a non-local filesystem (S3 in a cluster; here a SubTreeFileSystem) is downloaded into a
    directory private to the rank: two ranks of one node never rewrite the files the other has memory-mapped."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from pipelines.train_state import _local

    a, diffusion = _state(0)
    _train(a, diffusion, 2)
    local = tmp_path / "store" / "run" / "checkpoint_00000002"
    a.save(local)
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "store"), pyarrow.fs.LocalFileSystem())
    remote = Checkpoint("run/checkpoint_00000002", filesystem=fs)
    with _local(remote, 0) as d0, _local(remote, 1) as d1:
        assert d0 != d1 and not d0.is_relative_to(tmp_path) and (d0 / "model.safetensors").is_file()
        assert (d1 / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    assert not d0.exists() and not d1.exists()  # removed on exit
    with _local(Checkpoint(str(local)), 0) as d:
        assert d == local  # a local checkpoint is read in place
    b, _ = _state(1)
    assert restore_latest(b, remote, rank=1, device=CPU, log=print).name == "checkpoint_00000002" and b.step == 2


def test_resume_takes_a_stored_checkpoint_newer_than_the_one_ray_reported(tmp_path):
    """A node lost between a checkpoint's upload and the controller's next poll: Ray reports an older checkpoint
    (or none), the run's storage holds the newer one, and the run goes on from the newer one."""
    import pyarrow.fs
    from ray.train import Checkpoint

    a, diffusion = _state(0)
    for step in (2, 4):
        _train(a, diffusion, 2)
        a.save(tmp_path / "run" / f"checkpoint_{step:08d}")
    storage = (pyarrow.fs.LocalFileSystem(), str(tmp_path / "run"))
    for reported in (None, Checkpoint(str(tmp_path / "run" / "checkpoint_00000002"))):
        b, _ = _state(1)
        said: list[str] = []
        resumed = restore_latest(b, reported, rank=0, device=CPU, log=said.append, storage=storage)
        assert resumed.name == "checkpoint_00000004" and b.step == 4 and resumed.skipped == []
        assert len(said) == 1 and "newer than the checkpoint Ray Train reported" in said[0]
    _cut(tmp_path / "run" / "checkpoint_00000004" / "model.safetensors")  # the upload was cut short
    b, _ = _state(1)
    resumed = restore_latest(b, Checkpoint(str(tmp_path / "run" / "checkpoint_00000002")), rank=0, device=CPU,
                             log=print, storage=storage)
    assert resumed.name == "checkpoint_00000002" and resumed.skipped == ["checkpoint_00000004"] and b.step == 2
    _cut(tmp_path / "run" / "checkpoint_00000002" / "state.pt")
    assert restore_latest(_state(1)[0], None, rank=0, device=CPU, log=print, storage=storage) is None  # afresh
    assert restore_latest(_state(1)[0], None, rank=0, device=CPU, storage=(storage[0], str(tmp_path / "none"))) is None
