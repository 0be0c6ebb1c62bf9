"""Distributed training: Ray Train (``TorchTrainer``, DDP) over webdataset shards, tracked in MLflow.

The worker loop is one flat function (``train_loop_per_worker``): read this rank's shards, draw t with the
timestep sampler, ``GaussianDiffusion.training_losses``, AdamW step with warm-up and clipping, EMA update, and
every ``checkpoint_every`` steps a Ray Train checkpoint holding everything needed to resume exactly. The driver
(``run_training``) validates, starts the trainer, and at the end registers the EMA model in the MLflow registry.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors.torch import load_file

from diffusion_core import LossSecondMomentResampler, UniformSampler, create_diffusion
from pipelines.config import ConfigError, PipelineConfig, dump_yaml
from pipelines.data import DataResult, check_shard_count, make_loader, split_shards
from pipelines.model_io import build_unet, diffusion_kwargs, log_and_register, save_weights, write_model_dir
from pipelines.storage import train_storage

RUN_TAG = "ray_run_name"


class FaultInjection(BaseModel):
    """Failure drills (used by the fault-tolerance tests and by operators rehearsing recovery)."""

    kill_rank: int | None = None  # this rank's process exits ...
    kill_at_step: int | None = None  # ... when it reaches this step, on a run that did not resume
    kill_delay_s: float = 0.0  # wait first (Train V2 registers a reported checkpoint at its next poll)
    nan_from_step: int | None = None  # every loss from this step on is NaN


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


# ----------------------------------------------------------------------------------------------------------
# worker side


def _lr_lambda(warmup: int):
    # Linear warm-up to the base learning rate (Goyal et al. 2017), then constant as in DDPM.
    return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0


def _load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _new_window() -> dict[str, Any]:
    """Accumulators of one logging window: loss sum, per-quarter-of-T loss sums and counts, start time, steps."""
    return {"loss": 0.0, "q": [0.0] * 4, "qn": [0] * 4, "t0": time.time(), "steps": 0}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One DDP rank. ``config`` holds the resolved PipelineConfig, the DataResult and the MLflow run id."""
    import ray.train
    import ray.train.torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    cfg = PipelineConfig.model_validate(config["cfg"])
    data = DataResult.model_validate(config["data"])
    faults = FaultInjection.model_validate(config.get("faults") or {})
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = tc.threads_per_worker or max(1, int(tc.cpus_per_worker))
    torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS from num_cpus; make the choice explicit
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda" and tc.mixed_precision != "no"
    amp_dtype = torch.bfloat16 if tc.mixed_precision == "bf16" else torch.float16

    unet = build_unet(cfg.model, image_size=data.image_size, channels=data.channels,
                      num_classes=data.num_classes, learn_sigma=cfg.diffusion.learn_sigma)
    conditional = unet.config.get("num_classes") is not None
    diffusion = create_diffusion(**diffusion_kwargs(cfg.diffusion))
    unet.to(device)
    emas = [AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True) for d in tc.ema_decays]
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and tc.mixed_precision == "fp16")
    if cfg.diffusion.timestep_sampler == "uniform":
        ts_sampler = UniformSampler(diffusion)
    else:
        ts_sampler = LossSecondMomentResampler(diffusion)

    step, history, nonfinite_total, resumed_from = 0, [], 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            d = Path(d)
            unet.load_state_dict(load_file(str(d / "model.safetensors")))
            for i, ema in enumerate(emas):
                ema.load_state_dict(_load_state(d / f"ema_{i}.pt"))
            st = _load_state(d / "state.pt")
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            scaler.load_state_dict(st["scaler"])
            if hasattr(ts_sampler, "load_state_dict") and st.get("timestep_sampler") is not None:
                ts_sampler.load_state_dict(st["timestep_sampler"])
            step, history, nonfinite_total = int(st["step"]), list(map(list, st["history"])), int(st["nonfinite"])
            rng_file = d / f"rng_rank{rank}.pt"
            if rng_file.exists():
                torch.set_rng_state(_load_state(rng_file)["torch"])
        resumed_from = step
    else:
        torch.manual_seed(tc.seed * 1000 + rank)
    if compiled := tc.compile:
        unet = torch.compile(unet)
    model = ray.train.torch.prepare_model(unet, parallel_strategy_kwargs={"find_unused_parameters": False})
    raw = model.module if hasattr(model, "module") else model

    loader = make_loader(data.train_urls, rank=rank, world_size=world, batch_size=tc.batch_size,
                         num_workers=cfg.data.loader_workers, resampled=True, shuffle_buffer=cfg.data.shuffle_buffer,
                         random_flip=cfg.data.random_flip, channels=data.channels,
                         seed=tc.seed + 7919 * step, on_error=cfg.data.on_error)
    batches = iter(loader)
    my_shards = split_shards(data.train_urls, rank, world, 0, 1)
    samples_seen, local_loss_sum = 0, 0.0

    client = None
    if rank == 0:
        import mlflow

        from pipelines.tracking import mlflow_metrics

        mlflow.set_tracking_uri(config["tracking_uri"])
        client = mlflow.MlflowClient()
        client.log_param(config["mlflow_run_id"], f"threads_per_worker_rank0_attempt{resumed_from or 0}", threads)
        print(f"[train] world_size={world} device={device} threads/worker={threads} amp={use_amp} "
              f"compile={compiled} start_step={step}/{tc.max_steps}", flush=True)
    node_ids = gather_node_ids()  # [storage/cluster] a collective: every rank reports its Ray node
    if rank == 0:
        client.set_tag(config["mlflow_run_id"], "ray.node_ids", json.dumps(node_ids))

    T = diffusion.num_timesteps
    window = _new_window()
    consecutive_bad, last_ckpt_step, grad_norm = 0, step, torch.tensor(0.0)
    metrics: dict[str, float] = {}
    model.train()
    start_step, first_step_at, steady_from = step, None, None
    steady_mark = step + max(1, (tc.max_steps - step) // 5)  # throughput is measured after a short warm-up
    while step < tc.max_steps:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t, weights = ts_sampler.sample(x.shape[0], device)
        kwargs = {"y": y} if conditional else {}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            losses = diffusion.training_losses(model, x, t, model_kwargs=kwargs)
        per_example = losses["loss"].float()
        loss = (per_example * weights).mean()
        if faults.nan_from_step is not None and step + 1 >= faults.nan_from_step:
            loss = loss * float("nan")
        # Every rank must take the same decision, or DDP's next allreduce would deadlock.
        finite = torch.isfinite(loss.detach()).float()
        if world > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1.0:
            opt.zero_grad(set_to_none=True)
            nonfinite_total += 1
            consecutive_bad += 1
            if consecutive_bad >= tc.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{consecutive_bad} consecutive non-finite losses at step {step + 1} "
                    f"(train.max_nonfinite_steps={tc.max_nonfinite_steps}); the last good checkpoint "
                    f"(step {last_ckpt_step}) is kept")
            continue
        consecutive_bad = 0
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        scaler.step(opt)
        scaler.update()
        sched.step()
        for ema in emas:
            ema.update_parameters(raw)
        if isinstance(ts_sampler, LossSecondMomentResampler):
            ts_sampler.update_with_local_losses(t, per_example.detach())
        step += 1
        if first_step_at is None:
            first_step_at = time.time()
        if step == steady_mark:
            steady_from = time.time()
        samples_seen += x.shape[0]
        local_loss_sum += float(loss.detach())
        loss_value = loss.item()
        history.append([step, loss_value])
        window["loss"] += loss_value
        window["steps"] += 1
        quart = (t * 4 // T).clamp(max=3)
        for q in range(4):
            sel = quart == q
            if sel.any():
                window["q"][q] += per_example[sel].sum().item()
                window["qn"][q] += int(sel.sum())

        if faults.kill_rank == rank and step == faults.kill_at_step and resumed_from is None:
            time.sleep(faults.kill_delay_s)
            print(f"[train] fault injection: rank {rank} exits at step {step}", flush=True)
            os._exit(1)

        if step % tc.log_every == 0 or step == tc.max_steps:
            dt = max(time.time() - window["t0"], 1e-9)
            metrics = {
                "loss": window["loss"] / max(window["steps"], 1),
                "grad_norm": float(grad_norm),
                "lr": sched.get_last_lr()[0],
                "images_per_sec": window["steps"] * tc.batch_size * world / dt,
                "nonfinite_steps": float(nonfinite_total),
                "skipped_samples": float(getattr(loader, "skipped", 0)),
            }
            for q in range(4):
                if window["qn"][q]:
                    metrics[f"loss_q{q}"] = window["q"][q] / window["qn"][q]
            if client is not None:
                client.log_batch(config["mlflow_run_id"], metrics=mlflow_metrics(metrics, step))
                eta = (tc.max_steps - step) * dt / max(window["steps"], 1)
                print(f"[train] step {step}/{tc.max_steps} loss {metrics['loss']:.4f} "
                      f"{metrics['images_per_sec']:.0f} img/s lr {metrics['lr']:.2e} eta {eta / 60:.1f} min",
                      flush=True)
            window = _new_window()

        if rank == 0 and (step % tc.sample_every == 0 or step == tc.max_steps):
            _log_sample_grid(client, config, emas[0].module, diffusion, data, step, device)

        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            with tempfile.TemporaryDirectory() as tmp:
                d = Path(tmp)
                torch.save({"torch": torch.get_rng_state()}, d / f"rng_rank{rank}.pt")
                # what this rank did since (re)start: lets an operator (and the tests) see every rank trained on
                # its own shards
                (d / f"rank{rank}.json").write_text(json.dumps({
                    "rank": rank, "world_size": world, "shards": my_shards, "samples_seen": samples_seen,
                    "local_loss_mean": local_loss_sum / max(1, step - (resumed_from or 0))}))
                if rank == 0:
                    save_weights(raw.state_dict(), d / "model.safetensors")
                    for i, ema in enumerate(emas):
                        torch.save(ema.state_dict(), d / f"ema_{i}.pt")
                    torch.save({
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict(), "step": step, "history": history,
                        "nonfinite": nonfinite_total,
                        "timestep_sampler": ts_sampler.state_dict() if hasattr(ts_sampler, "state_dict") else None,
                    }, d / "state.pt")
                    card = model_card(cfg, data, raw.config, step=step, run_id=config["mlflow_run_id"])
                    write_model_dir(d / "ema_model", emas[0].module.state_dict(), card)
                    (d / "config.yaml").write_text(dump_yaml(cfg))
                ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_{step:08d}")
            last_ckpt_step = step
    steady = None
    if steady_from is not None and step > steady_mark:
        steady = (step - steady_mark) * tc.batch_size * world / (time.time() - steady_from)
    return {"step": step, "resumed_from": resumed_from, "final_loss": history[-1][1] if history else None,
            "first_step_at": first_step_at, "images_per_sec": steady, "steps_run": step - start_step}


def _log_sample_grid(client, config, ema_model, diffusion, data: DataResult, step: int, device) -> None:
    """16 EMA samples (labels 0..K-1 cycled), 20 DPM-Solver++ steps, logged as an MLflow image + artifact."""
    from diffusion_core.samplers import sample
    from pipelines.images import make_grid

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
    grid = make_grid(x)  # 4 x 4
    client.log_image(config["mlflow_run_id"], grid, key="ema_samples", step=step)
    client.log_image(config["mlflow_run_id"], grid, artifact_file=f"samples/ema_step{step:08d}.png")


def model_card(cfg: PipelineConfig, data: DataResult, unet_config: dict[str, Any], *, step: int,
               run_id: str) -> dict[str, Any]:
    """The ``config.json`` of the registered model (everything needed to sample)."""
    return {
        "unet": unet_config,
        "diffusion": diffusion_kwargs(cfg.diffusion),
        "data": {"image_size": data.image_size, "channels": data.channels, "num_classes": data.num_classes,
                 "class_names": data.class_names, "fingerprint": data.fingerprint,
                 "normalisation": "pixels / 127.5 - 1 (range [-1, 1])"},
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


def run_training(cfg: PipelineConfig, data: DataResult, *, faults: FaultInjection | None = None,
                 register: bool = True, parent_run_id: str | None = None) -> TrainResult:
    """Train with Ray Train; a second call with the same ``train.run_name`` resumes that run."""
    import mlflow
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.tracking import ensure_ray, find_run, flatten, setup_mlflow

    check_before_start(cfg, data)
    exp_id = setup_mlflow(cfg)
    run_id = find_run(exp_id, RUN_TAG, cfg.train.run_name)
    if run_id is None:
        tags = {RUN_TAG: cfg.train.run_name, "data_fingerprint": data.fingerprint}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow.MlflowClient().create_run(exp_id, run_name=cfg.train.run_name, tags=tags)
        run_id = run.info.run_id
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            mlflow.log_params(flatten(cfg.to_dict()))
            mlflow.log_params({"world_size": cfg.train.num_workers, "device": "cuda" if cfg.train.use_gpu else "cpu",
                               "torch_version": torch.__version__, "ray_version": ray.__version__,
                               "python": platform.python_version()})
            mlflow.log_text(dump_yaml(cfg), "config.yaml")
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
        d = Path(d)
        card = json.loads((d / "ema_model" / "config.json").read_text())
        steps = int(card["training"]["steps"])
        final_loss = ret.get("final_loss")
        out = TrainResult(run_name=cfg.train.run_name, mlflow_run_id=run_id, checkpoint_path=result.checkpoint.path,
                          steps=steps, final_loss=final_loss, resumed_from_step=ret.get("resumed_from"),
                          data_fingerprint=data.fingerprint, started_at=started_at,
                          first_step_at=ret.get("first_step_at"), images_per_sec=ret.get("images_per_sec"))
        if register:
            out = _register(cfg, out, d, card, client)
    client.set_terminated(run_id, status="FINISHED")
    return out


def _register(cfg: PipelineConfig, out: TrainResult, ckpt_dir: Path, card: dict, client) -> TrainResult:
    """Register the EMA model once per (run, step): a resumed run that trained no further reuses its version."""
    run = client.get_run(out.mlflow_run_id)
    if run.data.tags.get("registered_steps") == str(out.steps) and run.data.tags.get("registered_version"):
        version = run.data.tags["registered_version"]
        name = cfg.registry.model_name
        return out.model_copy(update={"model_name": name, "model_version": version,
                                      "model_uri": f"models:/{name}/{version}"})
    state = load_file(str(ckpt_dir / "ema_model" / "weights.safetensors"))
    reg = log_and_register(state, card, run_id=out.mlflow_run_id, model_name=cfg.registry.model_name,
                           tags={"run_id": out.mlflow_run_id, "data_fingerprint": out.data_fingerprint,
                                 "steps": str(out.steps), "run_name": out.run_name},
                           alias="latest-trained")
    client.set_tag(out.mlflow_run_id, "registered_version", reg.version)
    client.set_tag(out.mlflow_run_id, "registered_steps", str(out.steps))
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
