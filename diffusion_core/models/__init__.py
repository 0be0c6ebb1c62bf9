"""Noise-prediction networks: the DDPM / ADM UNet and its diffusers weight import."""

from .diffusers_convert import (
    DDPM_CIFAR10_DIFFUSERS_CONFIG,
    convert_diffusers_state_dict,
    load_diffusers_unet2d,
    unet_config_from_diffusers,
)
from .embeddings import SinusoidalTimestepEmbedding, timestep_embedding
from .unet import AttentionBlock, GroupNorm32, ResBlock, UNet

__all__ = [
    "DDPM_CIFAR10_DIFFUSERS_CONFIG",
    "AttentionBlock",
    "GroupNorm32",
    "ResBlock",
    "SinusoidalTimestepEmbedding",
    "UNet",
    "convert_diffusers_state_dict",
    "load_diffusers_unet2d",
    "timestep_embedding",
    "unet_config_from_diffusers",
]
