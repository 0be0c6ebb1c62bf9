"""Noise-prediction networks: the DDPM / ADM UNet, its diffusers weight import, and the speed options."""

from .diffusers_convert import (
    DDPM_CIFAR10_DIFFUSERS_CONFIG,
    convert_diffusers_state_dict,
    load_diffusers_unet2d,
    unet_config_from_diffusers,
)
from .embeddings import SinusoidalTimestepEmbedding, timestep_embedding
from .fast import (
    CPU_WARMUP_BATCH_SIZES,
    CompiledUNet,
    MixedPrecision,
    autocast_forward,
    compile_options,
    compile_unet,
    cpu_has_native_bf16,
    fast_defaults,
    is_compiled,
    optimizer_kwargs,
    train_autocast_dtype,
)
from .unet import AttentionBlock, GroupNorm32, ResBlock, UNet

__all__ = [
    "CPU_WARMUP_BATCH_SIZES",
    "DDPM_CIFAR10_DIFFUSERS_CONFIG",
    "AttentionBlock",
    "CompiledUNet",
    "MixedPrecision",
    "GroupNorm32",
    "ResBlock",
    "SinusoidalTimestepEmbedding",
    "UNet",
    "autocast_forward",
    "compile_options",
    "compile_unet",
    "convert_diffusers_state_dict",
    "cpu_has_native_bf16",
    "fast_defaults",
    "is_compiled",
    "load_diffusers_unet2d",
    "optimizer_kwargs",
    "timestep_embedding",
    "train_autocast_dtype",
    "unet_config_from_diffusers",
]
