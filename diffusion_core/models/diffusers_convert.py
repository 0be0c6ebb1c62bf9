"""Import diffusers ``UNet2DModel`` checkpoints (e.g. the ``google/ddpm-cifar10-32`` layout) into our UNet.

Nothing is downloaded: the caller passes a state dict, a ``.safetensors`` / ``.bin`` file, or a local diffusers
model folder (``config.json`` + ``diffusion_pytorch_model.{safetensors,bin}``). Tensors are read with
safetensors or ``torch.load(weights_only=True)``.

Supported configs: positional timestep embedding, ``DownBlock2D`` / ``AttnDownBlock2D`` down blocks mirrored by
``UpBlock2D`` / ``AttnUpBlock2D`` up blocks, ``UNetMidBlock2D`` with attention, conv resampling, SiLU,
``resnet_time_scale_shift="default"``, optional ``num_class_embeds`` label table. Anything else raises
``NotImplementedError`` naming the field, rather than silently producing a different network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample

__all__ = ["DDPM_CIFAR10_DIFFUSERS_CONFIG", "load_diffusers_unet2d", "unet_config_from_diffusers",
           "convert_diffusers_state_dict"]

# The published ``google/ddpm-cifar10-32`` UNet2DModel config (Ho et al. 2020's CIFAR-10 network, inference
# config: no dropout), for weight files that come without their ``config.json``.
DDPM_CIFAR10_DIFFUSERS_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": None,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "act_fn": "silu",
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
}

_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors")


def _require(cfg: Mapping[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> Any:
    value = cfg.get(key, default)
    if value not in allowed:
        raise NotImplementedError(f"diffusers config {key}={value!r} is not supported (supported: {allowed})")
    return value


def unet_config_from_diffusers(cfg: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Translate a diffusers ``UNet2DModel`` config dict into our ``UNet`` constructor arguments."""
    cfg = dict(cfg)
    _require(cfg, "time_embedding_type", ("positional",), "positional")
    _require(cfg, "center_input_sample", (False,), False)
    _require(cfg, "mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
    _require(cfg, "add_attention", (True,), True)
    _require(cfg, "downsample_type", ("conv",), "conv")
    _require(cfg, "upsample_type", ("conv",), "conv")
    _require(cfg, "act_fn", ("silu", "swish"), "silu")
    _require(cfg, "resnet_time_scale_shift", ("default",), "default")
    _require(cfg, "class_embed_type", (None,), None)
    _require(cfg, "mid_block_scale_factor", (1, 1.0), 1)
    pad = _require(cfg, "downsample_padding", (0, 1), 1)
    groups = cfg.get("norm_num_groups", 32)
    if groups is None or cfg.get("attn_norm_num_groups") not in (None, groups):
        raise NotImplementedError("norm_num_groups=None or a different attn_norm_num_groups is not supported")

    channels = [int(c) for c in cfg.get("block_out_channels", (224, 448, 672, 896))]
    down = list(cfg.get("down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3))
    up = list(cfg.get("up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)))
    if not (len(channels) == len(down) == len(up)):
        raise ValueError("block_out_channels, down_block_types and up_block_types must have equal lengths")
    for name in down:
        if name not in _DOWN:
            raise NotImplementedError(
                f"down block type {name!r} is not supported (supported: {tuple(_DOWN)})"
            )
    for name in up:
        if name not in _UP:
            raise NotImplementedError(f"up block type {name!r} is not supported (supported: {tuple(_UP)})")
    base = channels[0]
    if any(c % base for c in channels):
        raise NotImplementedError(f"block_out_channels {channels} are not integer multiples of {base}")

    size = cfg.get("sample_size", 32)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise NotImplementedError(f"non-square sample_size {size} is not supported")
        size = size[0]
    size = int(size)
    attention = []
    for level, (d, u) in enumerate(zip(down, reversed(up), strict=True)):
        if _DOWN[d] != _UP[u]:
            raise NotImplementedError(
                f"attention at level {level} is not mirrored between down ({d}) and up ({u})"
            )
        if _DOWN[d]:
            attention.append(size // 2**level)

    head_dim = cfg.get("attention_head_dim", 8)
    ours: dict[str, Any] = {
        "in_channels": int(cfg.get("in_channels", 3)),
        "out_channels": int(cfg.get("out_channels", 3)),
        "model_channels": base,
        "channel_mult": [c // base for c in channels],
        "num_res_blocks": int(cfg.get("layers_per_block", 2)),
        "attention_resolutions": attention,
        "dropout": float(cfg.get("dropout", 0.0)),
        "num_heads": 1,
        "head_channels": -1 if head_dim is None else int(head_dim),
        "num_classes": cfg.get("num_class_embeds"),
        "image_size": size,
        "norm_groups": int(groups),
        "norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "downsample_padding": "asymmetric" if pad == 0 else "symmetric",
        "flip_sin_to_cos": bool(cfg.get("flip_sin_to_cos", True)),
        "downscale_freq_shift": float(cfg.get("freq_shift", 0)),
        "time_embed_dim": cfg.get("time_embedding_dim"),
    }
    ours.update(overrides)
    return ours


def _resblock_keys(ours: str, theirs: str) -> dict[str, str]:
    names = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
             "conv2": "conv2", "skip": "conv_shortcut"}  # fmt: skip
    return {f"{ours}.{a}.{p}": f"{theirs}.{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}


def _key_pairs(model: UNet) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Map our parameter names to diffusers' (1:1 renames) and list (our attention, their attention) prefixes."""
    renames: dict[str, str] = {
        f"{a}.{p}": f"{b}.{p}"
        for a, b in [("conv_in", "conv_in"), ("time_embed.fc1", "time_embedding.linear_1"),
                     ("time_embed.fc2", "time_embedding.linear_2"), ("out_norm", "conv_norm_out"),
                     ("out_conv", "conv_out")]
        for p in ("weight", "bias")
    }  # fmt: skip
    attentions: list[tuple[str, str]] = []

    def visit(ours: str, layer: Any, theirs_block: str, counters: dict[str, int]) -> None:
        kind = {ResBlock: "resnets", AttentionBlock: "attentions", Downsample: "downsamplers",
                Upsample: "upsamplers"}[type(layer)]  # fmt: skip
        theirs = f"{theirs_block}.{kind}.{counters.get(kind, 0)}"
        counters[kind] = counters.get(kind, 0) + 1
        if kind == "resnets":
            renames.update(_resblock_keys(ours, theirs))
        elif kind == "attentions":
            attentions.append((ours, theirs))
        else:
            renames.update({f"{ours}.conv.{p}": f"{theirs}.conv.{p}" for p in ("weight", "bias")})

    cfg = model.config
    levels, per_level = len(cfg["channel_mult"]), cfg["num_res_blocks"]
    counters: dict[int, dict[str, int]] = {}
    i = 0
    for level in range(levels):  # down path: per level num_res_blocks (+1 downsample except the last level)
        for _ in range(per_level + (level != levels - 1)):
            for j, layer in enumerate(model.down[i]):
                visit(f"down.{i}.{j}", layer, f"down_blocks.{level}", counters.setdefault(level, {}))
            i += 1
    mid_counters: dict[str, int] = {}
    for j, layer in enumerate(model.mid):
        visit(f"mid.{j}", layer, "mid_block", mid_counters)
    up_counters: dict[int, dict[str, int]] = {}
    for i, block in enumerate(model.up):  # up path: num_res_blocks + 1 entries per diffusers up block
        for j, layer in enumerate(block):
            level = i // (per_level + 1)
            visit(f"up.{i}.{j}", layer, f"up_blocks.{level}", up_counters.setdefault(level, {}))
    return renames, attentions


def convert_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: UNet
) -> dict[str, torch.Tensor]:
    """Return ``model``-compatible tensors from a diffusers ``UNet2DModel`` state dict (raises on leftovers)."""
    src = dict(state_dict)
    renames, attentions = _key_pairs(model)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in renames.items():
        if theirs in src:
            out[ours] = src.pop(theirs)
    for ours, theirs in attentions:
        for p in ("weight", "bias"):
            # current names (to_q/to_k/to_v/to_out.0) or the pre-0.14 ones (query/key/value/proj_attn)
            parts = []
            for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
                parts.append(src.pop(f"{theirs}.{new}.{p}", None))
                if parts[-1] is None:
                    parts[-1] = src.pop(f"{theirs}.{old}.{p}")
            out[f"{ours}.qkv.{p}"] = torch.cat(parts, dim=0)
            proj = src.pop(f"{theirs}.to_out.0.{p}", None)
            out[f"{ours}.proj.{p}"] = proj if proj is not None else src.pop(f"{theirs}.proj_attn.{p}")
            out[f"{ours}.norm.{p}"] = src.pop(f"{theirs}.group_norm.{p}")
    if model.label_embed is not None:
        table = src.pop("class_embedding.weight")
        null = torch.zeros(1, table.shape[1], dtype=table.dtype)  # diffusers has no null label: zero row
        out["label_embed.weight"] = torch.cat([table, null], dim=0)
    leftovers = sorted(src)
    if leftovers:
        raise ValueError(
            f"unexpected diffusers keys (config mismatch?): {leftovers[:8]}{'...' if len(leftovers) > 8 else ''}"
        )
    return out


def _read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_diffusers_unet2d(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> UNet:
    """Build our ``UNet`` from a diffusers ``UNet2DModel`` checkpoint.

    ``state_dict_or_path``: a state dict, a ``.safetensors`` / ``.bin`` / ``.pt`` file, or a local diffusers
    model folder. ``config``: the diffusers config as a dict or a ``config.json`` path (optional for a folder
    that contains one). ``overrides`` are passed to our ``UNet`` (e.g. ``use_checkpoint=True``,
    ``channels_last=True``); they must not change the architecture.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = Path(state_dict_or_path)
        if path.is_dir():
            if config is None and (path / "config.json").exists():
                config = path / "config.json"
            files = [path / f for f in _WEIGHT_FILES if (path / f).exists()]
            if not files:
                raise FileNotFoundError(f"no diffusers weights ({', '.join(_WEIGHT_FILES)}) in {path}")
            path = files[0]
        state_dict = _read_state_dict(path)
    else:
        state_dict = dict(state_dict_or_path)
    if config is None:
        raise ValueError("a diffusers config (dict or config.json path) is required")
    if isinstance(config, (str, os.PathLike)):
        config = json.loads(Path(config).read_text())
    elif hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    model = UNet(**unet_config_from_diffusers(config, **overrides))
    model.load_state_dict(convert_diffusers_state_dict(state_dict, model), strict=True)
    return model
