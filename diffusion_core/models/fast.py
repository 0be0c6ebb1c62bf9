"""Speed choices in one place: per-device defaults, the optimizer implementation, and ``torch.compile``.

``fast_defaults(device)`` is the single function that decides what depends on the device; it returns a flat dict
of str / bool values that a pipeline can log as-is (MLflow params, ``/v1/model``). Numbers behind each choice
come from ``benchmarks/perf_suite.py`` (CPU) and ``benchmarks/gpu_suite.sh`` (GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["fast_defaults", "optimizer_kwargs", "train_autocast_dtype", "autocast_forward", "cpu_has_native_bf16",
           "compile_options", "compile_unet", "CompiledUNet", "is_compiled", "CPU_WARMUP_BATCH_SIZES", "MixedPrecision"]

MixedPrecision = Literal["no", "bf16", "fp16"]

# One sample per graph a CPU run can need (see CompiledUNet): dynamo's size-1 specialisation, and both sides
# of oneDNN's batch-16 convolution heuristic.
CPU_WARMUP_BATCH_SIZES: tuple[int, ...] = (1, 2, 16)


def _fused_adam_supported(device: torch.device) -> bool:
    # torch >= 2.4 has fused Adam/AdamW kernels for CPU and CUDA (one kernel over all parameters).
    return device.type in ("cpu", "cuda")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: AMX tiles or AVX512-BF16 (oneDNN then runs bf16 convs / matmuls
    at several times the fp32 rate; elsewhere it emulates bf16 through fp32, which gains nothing)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's cpuinfo probes (torch >= 2.3)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _cuda_has_native_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def _cpu_has_native_fp16() -> bool:
    """AMX-FP16 (Granite Rapids and later): the only CPUs where fp16 autocast is not emulated."""
    return bool(getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)())


def train_autocast_dtype(device: torch.device | str | None = None,
                         mixed_precision: MixedPrecision = "bf16") -> torch.dtype | None:
    """The autocast dtype of a training step on ``device``, or None for plain fp32.

    ``mixed_precision`` is a request honoured where the device runs that dtype natively, fp32 elsewhere:
    "bf16" -> bfloat16 on CUDA with bf16 support and on CPUs with AMX / AVX512-BF16 (measured on such a CPU, one
    thread: 2.4x faster for the ddpm-cifar10 UNet at batch 8, 1.0-1.09x for the 1.1M-parameter quickstart UNet
    at batch 32, never slower); "fp16" -> float16 on CUDA and on AMX-FP16 CPUs (the caller then needs a
    GradScaler); "no" -> fp32. Only training autocasts: sampling, evaluation and serving stay fp32.
    """
    dev = _device(device)
    if mixed_precision == "no":
        return None
    if mixed_precision == "bf16":
        # on CUDA: Ampere or later (pre-Ampere GPUs only emulate bf16)
        native = _cuda_has_native_bf16() if dev.type == "cuda" else dev.type == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    if mixed_precision == "fp16":
        native = dev.type == "cuda" or (dev.type == "cpu" and _cpu_has_native_fp16())
        return torch.float16 if native else None
    raise ValueError(f"mixed_precision must be one of 'no', 'bf16', 'fp16', got {mixed_precision!r}")


def autocast_forward(model: Callable[..., torch.Tensor], device: torch.device | str,
                     dtype: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """``model`` run under ``torch.autocast(device.type, dtype)``, its output cast back to fp32, so everything
    computed from it (the diffusion's loss terms, the vb term's Gaussian log-likelihoods) stays fp32; with
    ``dtype`` None, ``model`` itself."""
    if dtype is None:
        return model
    device_type = torch.device(device).type

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype):
            out = model(*args, **kwargs)
        return out.float()

    return forward


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_defaults(device: torch.device | str | None = None, mixed_precision: MixedPrecision = "bf16") -> dict[str, Any]:
    """The measured-fastest choices for ``device`` (default: CUDA if present, else CPU), as a loggable dict.

    - ``channels_last``: NHWC weights and activations (oneDNN on CPU, cuDNN tensor-core convs on CUDA).
    - ``attention``: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where available).
    - ``optimizer``: ``fused`` Adam(W) where torch has the kernel, else ``foreach``.
    - ``sampling_grad_mode``: samplers run each step under ``torch.inference_mode``.
    - ``compile_backend`` / ``compile_dynamic_batch``: what ``compile_unet`` does when compilation is asked for.
    - ``compile_fallback_random``: compiled graphs draw dropout noise with aten's RNG, not inductor's generated
      one (CPU; see :func:`compile_options`).
    - ``tf32_matmul``: TF32 for fp32 matmuls/convs on CUDA (Ampere and later); no effect on CPU.
    - ``train_autocast_dtype``: what ``mixed_precision`` resolves to on this device (:func:`train_autocast_dtype`):
      "bfloat16", "float16" or "float32".
    """
    dev = _device(device)
    amp = train_autocast_dtype(dev, mixed_precision)
    return {
        "device_type": dev.type,
        "channels_last": True,
        "attention": "sdpa",
        "optimizer": "fused" if _fused_adam_supported(dev) else "foreach",
        "sampling_grad_mode": "inference_mode",
        "compile_backend": "inductor",
        "compile_dynamic_batch": True,
        "compile_fallback_random": compile_options(dev).get("fallback_random", False),
        "tf32_matmul": dev.type == "cuda",
        "train_autocast_dtype": str(amp or torch.float32).removeprefix("torch."),
    }


def optimizer_kwargs(device: torch.device | str | None = None) -> dict[str, bool]:
    """Keyword arguments for ``torch.optim.Adam`` / ``AdamW`` picking the implementation of ``fast_defaults``.

    ``fused=True`` updates every parameter in one kernel (same Adam math, Kingma & Ba 2015 Alg. 1; results agree
    with the per-tensor loop to float rounding)."""
    impl = fast_defaults(device)["optimizer"]
    return {"fused": True} if impl == "fused" else {"foreach": True}


class CompiledUNet(nn.Module):
    """A ``torch.compile``'d UNet that behaves like the original for everything but speed.

    The batch dimension of ``x`` / ``t`` / ``y`` is marked dynamic before each call, so one graph serves a whole
    range of batch sizes: dynamo specialises size 1, and on CPU the convolution backend changes at batch 16
    (oneDNN's heuristic), so ``CPU_WARMUP_BATCH_SIZES`` = (1, 2, 16) builds every graph a CPU run needs. Under
    ``torch.inference_mode`` the inputs are made inference tensors (a cheap copy when they are not), because
    dynamo guards on the dispatch keys that tell the two kinds apart and the samplers mix them (the noise
    x_T is a normal tensor, later x_t are inference tensors). Parameters are the original module's;
    ``state_dict`` / ``load_state_dict`` use the original's keys (no ``_orig_mod.`` prefix), and other
    attributes (``config``, ``num_classes``, ...) are read from the original.
    """

    def __init__(self, unet: nn.Module, **compile_kwargs: Any) -> None:
        super().__init__()
        self.unet = unet
        # Not registered as a submodule: its parameters are the original's.
        object.__setattr__(self, "_compiled", torch.compile(unet, **compile_kwargs))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x.device).expand(x.shape[0])
        args = [a for a in (x, t, y) if a is not None]
        if torch.is_inference_mode_enabled():
            args = [a if a.is_inference() else a.clone() for a in args]
        for a in args:
            if a.ndim > 0 and a.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return self._compiled(*args)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("unet"), name)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.unet.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        return self.unet.load_state_dict(state_dict, strict=strict, assign=assign)


def compile_options(device: torch.device | str | None = None, mode: str | None = None) -> dict[str, Any]:
    """Inductor options of :func:`compile_unet` on ``device``: those of ``mode`` (``torch.compile``'s modes), and
    on CPU ``fallback_random``: inductor's own dropout RNG (a generated per-element loop) made the compiled bf16
    training step of the ddpm-cifar10 UNet slower than eager (0.84x per-round median, batch 8, 1 thread); with
    aten's RNG it is 0.98x (re-measured after dropout's mask became float ops, :func:`~.unet.keep_mask`: 0.93x
    against 0.98x, 9 rounds each). On CUDA inductor's RNG fuses into its kernels, so it is kept."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode)) if mode else {}
    if _device(device).type == "cpu":
        options["fallback_random"] = True
    return options


def compile_unet(
    unet: nn.Module,
    *,
    mode: str | None = None,
    fullgraph: bool = False,
    warmup_batch_sizes: Iterable[int] = (),
    device: torch.device | str | None = None,
) -> CompiledUNet:
    """``torch.compile`` (inductor on CPU and CUDA) with a dynamic batch dimension; see :class:`CompiledUNet`.

    ``warmup_batch_sizes``: run one inference-mode forward per size now (eval mode, restored afterwards), so
    compilation is not counted in the first real call; ``CPU_WARMUP_BATCH_SIZES`` builds every graph that
    sampling at any batch size needs on CPU.
    """
    dev = torch.device(device) if device is not None else next(unet.parameters()).device
    compiled = CompiledUNet(unet, backend="inductor", options=compile_options(dev, mode), fullgraph=fullgraph)
    sizes = list(warmup_batch_sizes)
    if sizes:
        cfg = getattr(unet, "config", {})
        channels, size = int(cfg.get("in_channels", 3)), int(cfg.get("image_size", 32))
        was_training = unet.training
        unet.eval()
        with torch.inference_mode():  # the grad mode the samplers run in (dynamo guards on it)
            for b in sizes:
                x = torch.zeros(b, channels, size, size, device=dev)
                t = torch.zeros(b, dtype=torch.long, device=dev)
                y = None if cfg.get("num_classes") is None else torch.zeros(b, dtype=torch.long, device=dev)
                compiled(x, t, y)
        unet.train(was_training)
    return compiled


def is_compiled(module: Any) -> bool:
    """True for a :class:`CompiledUNet` or a ``torch.compile`` OptimizedModule."""
    return isinstance(module, CompiledUNet) or hasattr(module, "_orig_mod")
