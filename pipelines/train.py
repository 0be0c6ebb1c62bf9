"""Distributed training: Ray Train (``TorchTrainer``, DDP) over webdataset shards, tracked in MLflow.

The worker (``train_loop_per_worker``) reads top to bottom: build the network, the diffusion and the
``TrainState``; resume from the newest valid checkpoint (falling back past a torn one) or seed a fresh start;
then per step draw t with the timestep sampler, ``GaussianDiffusion.training_losses``, an AdamW step with
warm-up and clipping, the EMA update, and every ``checkpoint_every`` steps a Ray Train checkpoint that resumes
exactly. The driver (``run_training``) validates, finds or creates the MLflow run, starts the trainer, and at
the end registers the EMA model in the MLflow registry once per (run, step).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from diffusion_core.models import autocast_forward, compile_unet, fast_defaults, train_autocast_dtype
from pipelines.config import ConfigError, PipelineConfig, dump_yaml
from pipelines.data import DataResult, check_shard_count, make_loader, split_shards
from pipelines.images import NORMALISATION
from pipelines.model_io import (
    build_diffusion,
    build_timestep_sampler,
    build_unet,
    diffusion_card,
    unet_config,
    write_model_dir,
)
from pipelines.storage import train_storage
from pipelines.train_state import (
    LossWindow,
    TrainState,
    checkpoint_name,
    noise_probe,
    restore_latest,
    seed_rank,
)

RUN_TAG = "ray_run_name"


class FaultInjection(BaseModel):
    """Failure drills (used by the fault-tolerance tests and by operators rehearsing recovery)."""

    kill_rank: int | None = None  # this rank's process exits ...
    kill_at_step: int | None = None  # ... when it reaches this step, on a run that did not resume
    kill_delay_s: float = 0.0  # wait first (Train V2 registers a reported checkpoint at its next poll)
    nan_from_step: int | None = None  # every loss from this step on is NaN
    kill_after_version_created: bool = False  # the driver exits between creating a model version and aliasing it

    def arm(self, model: torch.nn.Module, *, rank: int, start_step: int, resumed: bool) -> Callable[[int], None]:
        """Install the worker drills; returns the hook to call after each optimizer step with the new step."""
        done = {"step": start_step}
        if self.nan_from_step is not None:
            # the network's output turns NaN once the coming step is nan_from_step or later
            def poison(_module, _inputs, output):
                return output * float("nan") if done["step"] + 1 >= self.nan_from_step else output

            model.register_forward_hook(poison)

        def after_step(step: int) -> None:
            done["step"] = step
            if self.kill_rank == rank and step == self.kill_at_step and not resumed:
                time.sleep(self.kill_delay_s)
                print(f"[train] fault injection: rank {rank} exits at step {step}", flush=True)
                os._exit(1)

        return after_step


class TrainResult(BaseModel):
    run_name: str
    mlflow_run_id: str
    checkpoint_path: str
    steps: int
    final_loss: float | None
    resumed_from_step: int | None
    model_name: str | None = None
    model_version: str | None = None
    model_uri: str | None = None
    data_fingerprint: str
    started_at: float | None = None  # driver wall clock when fit() was called
    first_step_at: float | None = None  # rank 0 wall clock when its first optimizer step finished
    images_per_sec: float | None = None  # global throughput after warm-up (None if too few steps ran)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is left intact."""


class AttemptStats:
    """What this rank did since it (re)started: samples, mean loss, when the first step ended, and the
    throughput after a short warm-up (the first fifth of the remaining steps)."""

    def __init__(self, start_step: int, max_steps: int) -> None:
        self.start_step, self.samples, self.loss_sum = start_step, 0, 0.0
        self.first_step_at: float | None = None
        self.steady_mark = start_step + max(1, (max_steps - start_step) // 5)
        self.steady_from: float | None = None

    def count(self, step: int, batch: int, loss: float) -> None:
        now = time.time()
        self.samples += batch
        self.loss_sum += loss
        self.first_step_at = self.first_step_at or now
        if step == self.steady_mark:
            self.steady_from = now

    def images_per_sec(self, step: int, global_batch: int) -> float | None:
        if self.steady_from is None or step <= self.steady_mark:
            return None
        return (step - self.steady_mark) * global_batch / (time.time() - self.steady_from)

    def report(self, step: int) -> dict[str, Any]:
        return {"samples_seen": self.samples, "start_step": self.start_step,
                "local_loss_mean": self.loss_sum / max(1, step - self.start_step)}


# ----------------------------------------------------------------------------------------------------------
# worker side


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (all ranks must take the same decision, or DDP's next
    allreduce would deadlock)."""
    finite = torch.isfinite(loss.detach()).float()
    if world > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return finite.item() == 1.0


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One DDP rank. ``config`` holds the resolved PipelineConfig, the DataResult and the MLflow run id."""
    import ray.train
    import ray.train.torch

    # Read the configuration and place this rank.
    cfg = PipelineConfig.model_validate(config["cfg"])
    data = DataResult.model_validate(config["data"])
    faults = FaultInjection.model_validate(config.get("faults") or {})
    tc, run_id = cfg.train, config["mlflow_run_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = tc.threads_per_worker or max(1, int(tc.cpus_per_worker))
    torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS from num_cpus; make the choice explicit
    device = ray.train.torch.get_device()
    amp_dtype = train_autocast_dtype(device, tc.mixed_precision)  # the core's per-device rule; None: fp32

    # Build the network, the diffusion and the training state (the same initial weights on every rank).
    torch.manual_seed(tc.seed)
    diffusion = build_diffusion(cfg.diffusion)
    unet = build_unet(cfg.model, image_size=data.image_size, channels=data.channels,
                      num_classes=data.num_classes, learn_sigma=cfg.diffusion.learn_sigma).to(device)
    conditional = unet.config.get("num_classes") is not None
    state = TrainState.create(unet, build_timestep_sampler(cfg.diffusion, diffusion), tc, device=device,
                              fp16=amp_dtype == torch.float16)  # a GradScaler only for fp16

    # Resume from the newest valid checkpoint in the run's storage (Ray's latest, or a newer one uploaded just
    # before a node was lost), else start fresh; either way each rank gets its own noise.
    run_dir = ctx.get_storage()  # DeveloperAPI (Ray 2.60): the run's filesystem and directory
    resumed = restore_latest(state, ray.train.get_checkpoint(), rank=rank, device=device,
                             log=print if rank == 0 else (lambda _msg: None),
                             storage=(run_dir.storage_filesystem, run_dir.experiment_fs_path))
    if resumed is None or not resumed.had_rng:  # fresh start, or a rank the checkpoint's world did not have
        seed_rank(tc.seed, rank, state.step)
    start_step, taken = state.step, set(resumed.skipped if resumed else [])
    state.data_seed = tc.seed + 7919 * start_step
    start_noise = noise_probe(device)
    after_step = faults.arm(unet, rank=rank, start_step=start_step, resumed=resumed is not None)

    # Wrap the network for DDP.
    model = compile_unet(unet) if tc.compile else unet  # inductor; state_dict keys stay unprefixed
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    network = autocast_forward(model, device, amp_dtype)  # the UNet in amp_dtype, its output and the loss in fp32

    # Open this rank's data stream.
    loader = make_loader(data.train_urls, rank=rank, world_size=world, batch_size=tc.batch_size,
                         num_workers=cfg.data.loader_workers, resampled=True, shuffle_buffer=cfg.data.shuffle_buffer,
                         random_flip=cfg.data.random_flip, channels=data.channels, seed=state.data_seed,
                         on_error=cfg.data.on_error, image_size=data.image_size, num_classes=data.num_classes)
    batches = iter(loader)
    my_shards = split_shards(data.train_urls, rank, world, 0, 1)

    # Open the MLflow client, start the system-metrics monitor and announce the start (rank 0).
    client = monitor = None
    if rank == 0:
        import mlflow

        from pipelines.lineage import start_system_metrics

        mlflow.set_tracking_uri(config["tracking_uri"])
        client = mlflow.MlflowClient()
        # CPU, memory, disk, network (and the GPUs) of rank 0's node, as system/... metrics of the run
        monitor = start_system_metrics(run_id, enabled=tc.system_metrics, interval_s=tc.system_metrics_interval_s,
                                       tracking_uri=config["tracking_uri"])
        client.log_param(run_id, f"threads_per_worker_rank0_attempt{start_step}", threads)
        # the per-device speed choices, as MLflow params (fast.train_autocast_dtype: what mixed_precision resolved to)
        for k, v in fast_defaults(device, tc.mixed_precision).items():
            client.log_param(run_id, f"fast.{k}", v)
        print(f"[train] world_size={world} device={device} threads/worker={threads} "
              f"autocast={amp_dtype or torch.float32} compile={tc.compile} start_step={start_step}/{tc.max_steps}",
              flush=True)
    node_ids = gather_node_ids()  # [storage/cluster] a collective: every rank reports its Ray node
    if rank == 0:
        client.set_tag(run_id, "ray.node_ids", json.dumps(node_ids))

    # Train.
    window, stats = LossWindow(diffusion.num_timesteps, time.time), AttemptStats(start_step, tc.max_steps)
    consecutive_bad, last_ckpt_step, grad_norm, metrics = 0, start_step, torch.tensor(0.0), {}
    model.train()
    while state.step < tc.max_steps:
        # Draw a batch and its timesteps; the importance-weighted loss.
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t, weights = state.timestep_sampler.sample(x.shape[0], device)
        losses = diffusion.training_losses(network, x, t, model_kwargs={"y": y} if conditional else {})
        per_example = losses["loss"].float()
        loss = (per_example * weights).mean()

        # Skip a non-finite step on every rank; too many in a row stop the run.
        state.optimizer.zero_grad(set_to_none=True)
        if not _all_finite(loss, world):
            state.nonfinite += 1
            consecutive_bad += 1
            if consecutive_bad >= tc.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{consecutive_bad} consecutive non-finite losses at step {state.step + 1} "
                    f"(train.max_nonfinite_steps={tc.max_nonfinite_steps}); the last good checkpoint "
                    f"(step {last_ckpt_step}) is kept")
            continue
        consecutive_bad = 0

        # Step the optimizer (clipped), the LR schedule, the EMAs and the timestep sampler.
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        for ema in state.emas:
            ema.update_parameters(unet)
        if hasattr(state.timestep_sampler, "update_with_local_losses"):
            state.timestep_sampler.update_with_local_losses(t, per_example.detach())

        # Count the step.
        state.step += 1
        loss_value = loss.item()
        state.losses.add(state.step, loss_value)
        window.add(loss_value, t, per_example)
        stats.count(state.step, x.shape[0], loss_value)
        after_step(state.step)
        last = state.step == tc.max_steps

        # Log the window's metrics.
        if state.step % tc.log_every == 0 or last:
            metrics = _log_window(client, run_id, window.flush(), grad_norm, state, loader, tc, world)

        # Log an EMA sample grid.
        if rank == 0 and (state.step % tc.sample_every == 0 or last):
            _log_sample_grid(client, config, state.emas[0].module, diffusion, data, state.step, device)

        # Save a checkpoint.
        if state.step % tc.checkpoint_every == 0 or last:
            report = {**stats.report(state.step), "shards": my_shards, "start_noise": start_noise,
                      "noise_probe": noise_probe(device)}
            _save_checkpoint(state, cfg, data, run_id, report, rank=rank, world=world, device=device,
                             name=checkpoint_name(state.step, taken), metrics=metrics)
            last_ckpt_step = state.step

    # Done: stop the monitor; what the driver reports.
    if monitor is not None:
        monitor.finish()
    return {"step": state.step, "resumed_from": start_step if resumed else None, "final_loss": state.losses.last,
            "first_step_at": stats.first_step_at, "images_per_sec": stats.images_per_sec(state.step, tc.batch_size * world),
            "steps_run": state.step - start_step}


def _log_window(client, run_id: str, window: dict[str, float], grad_norm: torch.Tensor, state: TrainState,
                loader, tc, world: int) -> dict[str, float]:
    """The metrics of one logging window; rank 0 (with ``client``) logs them to MLflow and prints a line."""
    metrics = {k: v for k, v in window.items() if k not in ("steps", "seconds")}
    metrics.update({
        "grad_norm": float(grad_norm),
        "lr": state.scheduler.get_last_lr()[0],
        "images_per_sec": window["steps"] * tc.batch_size * world / window["seconds"],
        "nonfinite_steps": float(state.nonfinite),
        "skipped_samples": float(getattr(loader, "skipped", 0)),
    })
    if client is not None:
        from pipelines.tracking import mlflow_metrics

        client.log_batch(run_id, metrics=mlflow_metrics(metrics, state.step))
        eta = (tc.max_steps - state.step) * window["seconds"] / max(window["steps"], 1)
        print(f"[train] step {state.step}/{tc.max_steps} loss {metrics['loss']:.4f} "
              f"{metrics['images_per_sec']:.0f} img/s lr {metrics['lr']:.2e} eta {eta / 60:.1f} min", flush=True)
    return metrics


def _save_checkpoint(state: TrainState, cfg: PipelineConfig, data: DataResult, run_id: str,
                     report: dict[str, Any], *, rank: int, world: int, device: torch.device, name: str,
                     metrics: dict[str, float]) -> None:
    """This rank's part of a Ray Train checkpoint: the TrainState, and on rank 0 the registrable EMA model."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if rank == 0:
            card = model_card(cfg, data, state.model.config, step=state.step, run_id=run_id)
            write_model_dir(d / "ema_model", state.emas[0].module.state_dict(), card)
            (d / "config.yaml").write_text(dump_yaml(cfg))
        state.save(d, rank=rank, world_size=world, device=device, extra=report)  # manifest last
        ray.train.report({**metrics, "step": state.step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)


def _log_sample_grid(client, config, ema_model, diffusion, data: DataResult, step: int, device) -> None:
    """16 EMA samples (labels 0..K-1 cycled), 20 DPM-Solver++ steps, logged as an MLflow image + artifact."""
    from diffusion_core.samplers import sample
    from pipelines.images import READABLE_WIDTH, make_grid

    n = 16
    kwargs = {}
    if data.num_classes and ema_model.config.get("num_classes"):
        kwargs = {"y": (torch.arange(n) % data.num_classes).to(device)}
    was_training = ema_model.training
    ema_model.eval()
    with torch.no_grad():
        x = sample(diffusion, ema_model, (n, data.channels, data.image_size, data.image_size),
                   sampler="dpm_solver", steps=20, generator=torch.Generator().manual_seed(0),
                   model_kwargs=kwargs, device=device)
    ema_model.train(was_training)
    grid = make_grid(x, min_width=READABLE_WIDTH)  # 4 x 4, enlarged (nearest neighbour) to >= 256 px wide
    client.log_image(config["mlflow_run_id"], grid, key="ema_samples", step=step)
    client.log_image(config["mlflow_run_id"], grid, artifact_file=f"samples/ema_step{step:08d}.png")


def model_card(cfg: PipelineConfig, data: DataResult, unet_config: dict[str, Any], *, step: int,
               run_id: str) -> dict[str, Any]:
    """The ``config.json`` of the registered model (everything needed to sample)."""
    return {
        "unet": unet_config,
        "diffusion": diffusion_card(cfg.diffusion),
        "data": {"image_size": data.image_size, "channels": data.channels, "num_classes": data.num_classes,
                 "class_names": data.class_names, "fingerprint": data.fingerprint, "normalisation": NORMALISATION},
        "training": {"steps": step, "run_id": run_id, "run_name": cfg.train.run_name,
                     "ema_decay": cfg.train.ema_decays[0]},
    }


# ----------------------------------------------------------------------------------------------------------
# driver side


def check_before_start(cfg: PipelineConfig, data: DataResult) -> None:
    """Problems that can be seen before Ray starts: raise ConfigError naming the field."""
    try:
        check_shard_count(len(data.train_urls), cfg.train.num_workers, cfg.data.loader_workers)
    except ValueError as e:
        raise ConfigError(f"train.num_workers / data.loader_workers: {e}") from None
    if cfg.model.class_conditional and data.num_classes == 0:
        raise ConfigError("model.class_conditional is true but the dataset has no labels")
    unet_config(cfg.model, image_size=data.image_size, channels=data.channels, num_classes=data.num_classes,
                learn_sigma=cfg.diffusion.learn_sigma)  # a preset refuses conflicting architecture fields


def _mlflow_run(cfg: PipelineConfig, data: DataResult, parent_run_id: str | None) -> str:
    """Find or create the MLflow run of ``train.run_name`` (one per training run, also under concurrent
    drivers); a new run gets the config as params and as ``config.yaml``, and its train split as a dataset input."""
    import mlflow
    import ray

    from pipelines.lineage import shard_dataset
    from pipelines.tracking import find_or_create_run, flatten, setup_mlflow

    exp_id = setup_mlflow(cfg)
    tags = {"data_fingerprint": data.fingerprint, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    run_id, created = find_or_create_run(exp_id, RUN_TAG, cfg.train.run_name, run_name=cfg.train.run_name, tags=tags)
    if created:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            mlflow.log_params(flatten(cfg.to_dict()))
            mlflow.log_params({"world_size": cfg.train.num_workers, "device": "cuda" if cfg.train.use_gpu else "cpu",
                               "torch_version": torch.__version__, "ray_version": ray.__version__,
                               "python": platform.python_version()})
            mlflow.log_text(dump_yaml(cfg), "config.yaml")
            mlflow.log_input(shard_dataset(data, "train"), context="training")
    return run_id


def run_training(cfg: PipelineConfig, data: DataResult, *, faults: FaultInjection | None = None,
                 register: bool = True, parent_run_id: str | None = None) -> TrainResult:
    """Train with Ray Train; a second call with the same ``train.run_name`` resumes that run."""
    import mlflow
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.tracking import ensure_ray

    check_before_start(cfg, data)
    run_id = _mlflow_run(cfg, data, parent_run_id)
    ensure_ray(cfg)
    storage = cfg.train.storage_path
    if storage is None:
        cfg.workspace.ray_results.mkdir(parents=True, exist_ok=True)
        storage = str(cfg.workspace.ray_results)
    storage, storage_fs = train_storage(storage)  # [storage] s3:// / gs:// through pipelines.storage's filesystem
    # [cluster] a worker group that cannot get its resources (a node lost for good) gives up after resource_wait_s,
    # max_failures + 1 times at most, instead of waiting forever (Train V2 reads this from the driver's env)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.train.resource_wait_s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "data": data.model_dump(mode="json"), "mlflow_run_id": run_id,
                           "tracking_uri": cfg.tracking_uri, "faults": faults.model_dump() if faults else None},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo", timeout_s=cfg.train.timeout_s),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name, storage_path=storage, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures,
                                                   controller_failure_limit=cfg.train.max_failures),  # [cluster]
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
        ),
    )
    client = mlflow.MlflowClient()
    # RUNNING while Ray trains (start_run's exit above, or an earlier attempt, marked it terminated): the UI shows
    # it as running, and the system-metrics monitor on rank 0 samples only a running run.
    client.update_run(run_id, status="RUNNING")
    started_at = time.time()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the MLflow run honest and re-raise with context
        client.set_terminated(run_id, status="FAILED")
        msg = str(e)
        if "worker group startup timed out" in msg:  # [cluster]
            msg = (f"the cluster lacks the resources for train.num_workers={cfg.train.num_workers} workers (a node "
                   f"lost and not back within train.resource_wait_s={cfg.train.resource_wait_s:g} s): {msg}")
        raise RuntimeError(f"training run '{cfg.train.run_name}' failed: {msg}") from e
    if result.checkpoint is None:
        client.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training run '{cfg.train.run_name}' produced no checkpoint")
    ret = result.return_value or {}
    with result.checkpoint.as_directory() as d:
        model_dir = Path(d) / "ema_model"
        card = json.loads((model_dir / "config.json").read_text())
        out = TrainResult(run_name=cfg.train.run_name, mlflow_run_id=run_id, checkpoint_path=result.checkpoint.path,
                          steps=int(card["training"]["steps"]), final_loss=ret.get("final_loss"),
                          resumed_from_step=ret.get("resumed_from"), data_fingerprint=data.fingerprint,
                          started_at=started_at, first_step_at=ret.get("first_step_at"),
                          images_per_sec=ret.get("images_per_sec"))
        if register:
            out = register_trained(cfg, out, model_dir, faults=faults)
    client.set_terminated(run_id, status="FINISHED")
    return out


def register_trained(cfg: PipelineConfig, out: TrainResult, model_dir: Path, *,
                     faults: FaultInjection | None = None) -> TrainResult:
    """Register the EMA model in ``model_dir`` once per (MLflow run, step): the version carries that key from its
    creation, so a resumed or repeated registration reuses it; alias ``latest-trained`` points at it."""
    from safetensors.torch import load_file

    from pipelines.model_io import log_and_register

    def drill(version: str) -> None:  # fault drill: die between creating the version and aliasing it
        print(f"[train] fault injection: driver exits after creating version {version}", flush=True)
        os._exit(1)

    card = json.loads((model_dir / "config.json").read_text())
    reg = log_and_register(load_file(str(model_dir / "weights.safetensors")), card, run_id=out.mlflow_run_id,
                           model_name=cfg.registry.model_name,  # run id (mv.run_id), data and steps live on the run
                           alias="latest-trained", idempotence_key=f"{out.mlflow_run_id}:{out.steps}",
                           # at its step, not 0: the model gets the final training metrics, not step 0's samples of
                           # the system metrics (whose steps count samples; they meet only if both counts agree)
                           step=out.steps,
                           after_create=drill if faults and faults.kill_after_version_created else None)
    return out.model_copy(update={"model_name": reg.name, "model_version": reg.version, "model_uri": reg.uri})


# ------------------------------------------------------------------------------ [storage/cluster] node ids
def gather_node_ids() -> list[str]:
    """The Ray node id of every rank, in rank order (MLflow tag ``ray.node_ids``). A collective: all ranks call it."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    ids: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(ids, mine)
    return [str(i) for i in ids]
