"""One validated configuration for every stage: ``PipelineConfig``.

YAML files in ``configs/`` and ``--set a.b=value`` overrides are merged and validated here; every error names
the field path and, where the field is a choice, the accepted values. Defaults are the embedded quickstart.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Read once at import: mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI into this process's environment,
# which must not leak the first workspace's database into configs validated later.
_ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


class ConfigError(ValueError):
    """A configuration problem; the message names every bad field path and what is accepted."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WorkspaceConfig(_Section):
    root: Path = Field(Path("workspace"), description="Local root for shards, Ray results and MLflow (SQLite).")
    store: str | None = Field(
        None,
        description="Shared store for a cluster run: s3://bucket/prefix or gs://bucket/prefix. Prepared shards go "
        "to <store>/data and stage records to <store>/pipeline, so every node and every re-submitted job sees "
        "them. None: both stay under workspace.root.",
    )

    @field_validator("store")
    @classmethod
    def _store_uri(cls, v: str | None) -> str | None:
        from pipelines.storage import check_object_uri

        return None if v is None else check_object_uri(v, field="workspace.store")

    @property
    def data_dir(self) -> Path:
        return self.root.resolve() / "data"

    @property
    def data_uri(self) -> str:
        """Where prepared shards live: ``<store>/data`` or the local ``data_dir``."""
        return f"{self.store}/data" if self.store else str(self.data_dir)

    @property
    def records_uri(self) -> str:
        """Where stage records (and the workspace lock) live: ``<store>/pipeline`` or ``<root>/pipeline``."""
        return f"{self.store}/pipeline" if self.store else str(self.root.resolve() / "pipeline")

    @property
    def ray_results(self) -> Path:
        return self.root.resolve() / "ray_results"

    @property
    def mlflow_db(self) -> Path:
        return self.root.resolve() / "mlflow.db"

    @property
    def mlartifacts(self) -> Path:
        return self.root.resolve() / "mlartifacts"

    @property
    def outputs(self) -> Path:
        return self.root.resolve() / "outputs"


class DataConfig(_Section):
    source: Literal["digits", "image_folder", "cifar10", "shards"] = Field(
        "digits",
        description="digits: scikit-learn's bundled 8x8 digits (no download); image_folder: root/<class>/*.png|jpg; "
        "cifar10: path to cifar-10-python.tar.gz; shards: existing webdataset shards (glob, brace pattern or URL).",
    )
    path: str | None = Field(None, description="Input for image_folder / cifar10 / shards sources.")
    test_path: str | None = Field(None, description="shards source only: held-out shards (optional).")
    image_size: int = Field(16, gt=0, le=1024, description="Side length in pixels of the square images.")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale (L), 3 = RGB.")
    samples_per_shard: int = Field(
        256,
        gt=0,
        description="Samples per tar shard. 256 gives digits 7 train shards (enough for 2 ranks x 2 loader "
        "workers) and CIFAR-10 ~196 shards of ~0.6 MB; raise it for object storage (aim for 10-100 MB shards).",
    )
    num_classes: int | None = Field(
        None,
        ge=0,
        description="shards source only: number of classes (0 = unlabelled). None: from the shards' manifest.json; "
        "required for shards without one (never guessed from the data). Every label read must lie in "
        "[0, num_classes).",
    )
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out fraction (seeded split).")
    split_seed: int = Field(0, description="Seed of the train/test split.")
    loader_workers: int = Field(1, ge=0, description="DataLoader worker processes per training rank.")
    shuffle_buffer: int = Field(1000, ge=0, description="webdataset shuffle buffer (samples); 0 disables.")
    random_flip: bool = Field(False, description="Random horizontal flip (off for digits: flipped digits differ).")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="Corrupt samples/shards: raise (naming shard and key) or skip and count them."
    )
    prepare_tasks: int | None = Field(
        None, ge=1, description="Parallel Ray tasks writing shards (the bytes do not depend on it). None: one per "
        "CPU of the running Ray cluster for sources of 10,000+ images, else serial; 1: serial, in this process.",
    )


_ARCH = "Architecture field: under a preset leave it unset (or give the preset's value); under 'custom' None means the quickstart value."


class ModelConfig(_Section):
    preset: Literal["quickstart", "ddpm_cifar10", "custom"] = Field(
        "quickstart",
        description="UNet preset; a preset fixes the architecture fields (model_channels .. resblock_updown) and "
        "refuses different values for them; 'custom' starts from the quickstart architecture and takes every "
        "architecture field that is set. dropout, label dropout and memory options always apply.",
    )
    model_channels: int | None = Field(None, gt=0, description=_ARCH + " Quickstart: 32.")
    channel_mult: list[int] | None = Field(None, min_length=1, description=_ARCH + " Quickstart: [1, 2, 2].")
    num_res_blocks: int | None = Field(None, gt=0, description=_ARCH + " Quickstart: 1.")
    attention_resolutions: list[int] | None = Field(
        None, description="Feature-map sizes (pixels) with self-attention. " + _ARCH + " Quickstart: [image_size/2].")
    num_heads: int | None = Field(None, gt=0, description=_ARCH + " Quickstart: 2.")
    head_channels: int | None = Field(None, description="Channels per head; -1: use num_heads. " + _ARCH)
    use_scale_shift_norm: bool | None = Field(None, description="AdaGN (Dhariwal & Nichol 2021). " + _ARCH)
    resblock_updown: bool | None = Field(None, description="Resample inside ResBlocks (BigGAN style). " + _ARCH)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    class_conditional: bool = Field(True, description="Condition on labels (needs a labelled dataset).")
    class_dropout_prob: float = Field(0.1, ge=0.0, le=1.0, description="Label dropout for classifier-free guidance.")
    use_checkpoint: bool = Field(False, description="Gradient checkpointing (saves memory, costs compute).")
    channels_last: bool = Field(True, description="NHWC weights/activations (the core's measured-faster default).")


class DiffusionConfig(_Section):
    noise_schedule: Literal[
        "linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sigmoid", "quad", "const", "jsd", "warmup10",
        "warmup50",
    ] = "linear"
    diffusion_steps: int = Field(1000, gt=1, le=100_000, description="T, the number of forward steps.")
    predict: Literal["epsilon", "x0", "v"] = Field("epsilon", description="What the network predicts.")
    learn_sigma: bool = Field(False, description="Learn the variance (LEARNED_RANGE, hybrid loss).")
    sigma_small: bool = Field(False, description="Fixed variance: small (posterior) instead of large (beta).")
    use_kl: bool = False
    rescale_learned_sigmas: bool = False
    timestep_sampler: Literal["uniform", "loss-second-moment"] = Field(
        "uniform", description="Training-time distribution of t: uniform, or importance sampling by the loss "
        "second moment (Nichol & Dhariwal 2021, Sec. 3.3).")
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-gamma loss weighting (Hang et al. 2023).")

    @model_validator(mode="after")
    def _no_ignored_fields(self) -> DiffusionConfig:
        # a field that another one overrides would do nothing: refuse the combination instead
        if self.learn_sigma and self.sigma_small:
            raise ValueError("diffusion.sigma_small applies to a fixed variance; it has no effect with "
                             "diffusion.learn_sigma=true")
        if self.use_kl and self.rescale_learned_sigmas:
            raise ValueError("diffusion.rescale_learned_sigmas has no effect with diffusion.use_kl=true")
        return self


class TrainConfig(_Section):
    run_name: str = Field("quickstart", min_length=1, description="Ray Train run name; same name resumes.")
    num_workers: int = Field(2, ge=1, description="Ray Train DDP workers.")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(None, ge=1, description="torch.set_num_threads per worker (None: cpus).")
    batch_size: int = Field(64, ge=1, description="Per-worker batch size.")
    max_steps: int = Field(2000, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decays: list[float] = Field([0.999], min_length=1, description="EMA rates; the first is registered.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "bf16", description="Training autocast dtype where the device runs it natively, else fp32: bf16 on CUDA with "
        "bf16 and on CPUs with AMX/AVX512-BF16, fp16 (with a GradScaler) on CUDA and AMX-FP16 CPUs; 'no': fp32. "
        "Logged as the MLflow param fast.train_autocast_dtype. Sampling, evaluation and serving are fp32.")
    compile: bool = False
    seed: int = 0
    log_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    sample_every: int = Field(1000, ge=1)
    system_metrics: bool = Field(True, description="Log MLflow system metrics (CPU, memory, disk, network; NVIDIA "
                                 "GPUs with the 'gpu' extra) into the training run, sampled on the rank-0 worker.")
    system_metrics_interval_s: float = Field(10.0, gt=0, description="Seconds between system-metric samples.")
    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="Worker-group restarts before the run fails.")
    max_nonfinite_steps: int = Field(20, ge=1, description="Consecutive non-finite losses that stop the run.")
    timeout_s: int = Field(600, ge=10, description="DDP collective timeout (gloo/NCCL).")
    resource_wait_s: float = Field(
        300.0, ge=10, description="How long a (re)started worker group waits for its resources (e.g. a lost node "
        "coming back) before that attempt fails; after max_failures + 1 such attempts the run fails.")
    storage_path: str | None = Field(
        None, description="Ray Train checkpoint storage (s3://, gs://, shared FS); None: workspace/ray_results."
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _quoted_no(cls, v: Any) -> Any:
        if isinstance(v, bool):  # YAML 1.1 reads a bare `no` as false; say so instead of "got False"
            raise ValueError(f"must be one of 'no', 'bf16', 'fp16' (got the boolean {v}: YAML reads a bare no "
                             "as false, so quote it: mixed_precision: 'no')")
        return v

    @field_validator("ema_decays")
    @classmethod
    def _ema_range(cls, v: list[float]) -> list[float]:
        for d in v:
            if not 0.0 < d < 1.0:
                raise ValueError(f"every EMA decay must lie in (0, 1), got {d}")
        return v


# diffusion_core.samplers.SAMPLERS as a type (tests check the two agree)
SamplerName = Literal["ddpm", "ddim", "dpm_solver"]


class SamplerSpec(_Section):
    sampler: SamplerName
    steps: int = Field(gt=0)


# The metrics evaluate produces that the promotion gate can compare, by the direction in which they improve
# (pipelines.evaluate.gate reads these; tests check the Literal agrees with them).
LOWER_IS_BETTER = ("frechet_distance", "frechet_ratio", "fid", "bpd")
HIGHER_IS_BETTER = ("class_accuracy", "inception_score")
PrimaryMetric = Literal["frechet_distance", "frechet_ratio", "fid", "bpd", "class_accuracy", "inception_score"]


class EvaluateConfig(_Section):
    num_samples: int = Field(500, ge=10, description="Generated images per metric.")
    sampler: SamplerSpec = Field(SamplerSpec(sampler="dpm_solver", steps=20), description="Sampler for the gate.")
    sampler_table: list[SamplerSpec] = Field(
        [
            SamplerSpec(sampler="ddpm", steps=1000),
            SamplerSpec(sampler="ddim", steps=10),
            SamplerSpec(sampler="ddim", steps=20),
            SamplerSpec(sampler="ddim", steps=50),
            SamplerSpec(sampler="ddim", steps=100),
            SamplerSpec(sampler="dpm_solver", steps=10),
            SamplerSpec(sampler="dpm_solver", steps=20),
        ],
        description="Samplers measured in the quality/speed table (empty list skips it).",
    )
    guidance_scale: float = Field(1.0, ge=0.0)
    primary_metric: PrimaryMetric = Field(
        "frechet_distance", description="Metric the promotion gate compares: lower is better for "
        f"{', '.join(LOWER_IS_BETTER)}; higher is better for {', '.join(HIGHER_IS_BETTER)}.")
    promote_margin: float = Field(0.0, ge=0.0, description="Relative margin the new model must beat champion by.")
    bpd_subset: int = Field(64, ge=0, description="Held-out images for bits/dim (0 skips).")
    inception_weights: str | None = Field(None, description="Local InceptionV3 FID weights; None skips FID.")
    classifier_steps: int = Field(400, ge=1, description="Training steps of the embedded reference classifier.")
    use_gpu: bool = False
    compile: bool = Field(False, description="torch.compile the UNet for sampling (warm-up excluded from timings).")
    seed: int = Field(0, description="Seed of the evaluation noise and subsets (same seed: comparable numbers).")
    sample_batch_size: int = Field(256, ge=1, description="Images per sampling batch inside an evaluation task.")
    cpus_per_task: float = Field(1.0, gt=0, description="Ray CPUs per evaluation task (torch threads follow).")
    concurrency: int = Field(
        1, ge=1, description="Evaluation tasks in flight at once. 1 keeps the sampler table's seconds/image "
        "free of contention on a shared machine; raise it on a cluster where each task gets its own GPU/node.")


class RegistryConfig(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (None: $MLFLOW_TRACKING_URI, else sqlite in the workspace)."
    )
    experiment_name: str = "diffusion-pipeline"
    model_name: str = Field("diffusion-quickstart", min_length=1)
    champion_alias: str = "champion"


# serve.pack_ratio=auto by device: on CPU a forward's time grows with its rows, so size classes keep short requests
# fast (DDIM-10 beside DDPM-1000 at 2.5-3.2x idle vs 5.7x with fill, -18% rows/s); a GPU forward is nearly flat in rows
SERVE_PACK_RATIO_AUTO = {"cpu": 4.0, "cuda": None}


def resolve_pack_ratio(pack_ratio: float | str | None, device: str) -> float | None:
    """serve.pack_ratio as the engine takes it: ``auto`` becomes the device's entry of SERVE_PACK_RATIO_AUTO."""
    return SERVE_PACK_RATIO_AUTO.get(device) if pack_ratio == "auto" else pack_ratio


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_uri: str | None = Field(None, description="Model to serve (None: models:/<registry.model_name>@champion).")
    use_gpu: bool = False
    num_replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(16, ge=1, description="Most rows in one UNet forward of the engine (1 = unbatched); "
                                "a guided image counts 2 rows, a larger request is spread over several forwards.")
    max_samples_per_request: int = Field(16, ge=1)
    max_request_cost: int | None = Field(
        None, ge=1, description="Most rows x steps (x2 with guidance) one request may cost; beyond it 422 "
        "(None: max_samples_per_request x T x 2, the largest request the other bounds accept).")
    max_queue_cost: int | None = Field(
        None, ge=1, description="Most outstanding cost per replica; beyond it 503 with Retry-After "
        "(None: 8 x max_request_cost).")
    request_timeout_s: float | None = Field(
        300.0, gt=0, description="A request not done after this long is dropped at the next step (504); None: never.")
    reload_interval_s: float = Field(
        15.0, ge=0, description="Seconds between polls of the served registry alias; a moved alias is loaded in the "
        "background and swapped in between steps (0: never).")
    compile: bool = Field(False, description="torch.compile the UNet (warm-up per padded batch size, no recompiles).")
    pack_ratio: Annotated[float, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="None: fill every UNet forward up to max_batch_size. A number (>= 1): a request costing "
        "more than this times the cheapest active one is long, and fills a forward only up to pack_rows rows (CPUs, "
        "where a forward's time grows with its rows: short requests then run in small, fast forwards; starved ones "
        "always join). auto: 4 on CPU, None on GPU (SERVE_PACK_RATIO_AUTO).")
    pack_rows: int | None = Field(
        None, ge=1, description="With pack_ratio: rows up to which long requests fill a forward beside short ones "
        "(1: only when starved; None: measured at model load, the largest batch whose forward costs <= 2.5x a 1-row "
        "one).")
    max_ongoing_requests: int = Field(256, ge=1, description="Per replica, HTTP requests held (streams included).")
    keep_alive: bool = Field(False, description="Keep serving after the deploy stage (local runs).")
    max_queued_requests: int = Field(
        64, ge=1, description="Requests allowed to wait at the proxy for a replica slot beyond max_ongoing_requests; "
        "beyond them requests get 503.",
    )
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...); "
        "replaces num_replicas when set.",
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="Logical CPUs reserved by each model replica.")
    threads_per_replica: int | None = Field(
        None, ge=1, description="torch.set_num_threads in each model replica (None: max(1, cpus_per_replica))."
    )

    def request_cost_bound(self, num_timesteps: int) -> int:
        """``max_request_cost``, or its default for a model of T steps: max_samples_per_request x T x 2."""
        return self.max_request_cost or self.max_samples_per_request * int(num_timesteps) * 2


class RayConfig(_Section):
    address: str | None = Field(None, description="Existing cluster ('auto', 'ray://...'); None starts local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="Local Ray only: logical CPUs to advertise.")
    object_store_memory_mb: int | None = Field(300, ge=78)


class PipelineConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()
    workspace: WorkspaceConfig = WorkspaceConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        if self.data.source in ("image_folder", "cifar10", "shards") and not self.data.path:
            raise ValueError(f"data.path is required when data.source is '{self.data.source}'")
        return self

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI in force: registry.tracking_uri, else $MLFLOW_TRACKING_URI, else the workspace's
        SQLite file."""
        return (self.registry.tracking_uri or _ENV_TRACKING_URI
                or f"sqlite:///{self.workspace.mlflow_db}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def section_fingerprint(self, *paths: str, exclude: tuple[str, ...] = ()) -> str:
        """Stable hash of the named sections or dotted fields (minus ``exclude``): decides whether a stage's
        output is still valid for this config."""
        tree = self.to_dict()
        for path in exclude:
            *parents, leaf = path.split(".")
            node = tree
            for k in parents:
                node = node[k]
            node.pop(leaf, None)
        payload = {}
        for path in paths:
            node = tree
            for k in path.split("."):
                node = node[k]
            payload[path] = node
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.max_steps=200), got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: bad key '{key}' in '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value '{raw}': {e}") from None
    return key, value


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``field.path: message (got value)``."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "invalid configuration:\n" + "\n".join(lines)


def validate_config(data: dict[str, Any]) -> PipelineConfig:
    """Validate a plain dict, raising ConfigError with field paths."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML file (or the defaults when ``path`` is None), apply ``a.b=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(data, key, value)
    return validate_config(data)


def dump_yaml(cfg: PipelineConfig) -> str:
    """The resolved configuration as YAML (what ``show-config`` prints and MLflow stores)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
