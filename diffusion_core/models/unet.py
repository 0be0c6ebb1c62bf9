"""UNet noise predictor of the DDPM / ADM family.

Architecture: Ho et al. 2020 (DDPM, app. B: Wide-ResNet blocks + self-attention at 16x16, PixelCNN++-style UNet),
with the options of Nichol & Dhariwal 2021 (IDDPM: learned variance, multi-head attention) and Dhariwal &
Nichol 2021 (ADM: adaptive group norm "scale-shift", resblock up/down-sampling, class conditioning).
Classifier-free guidance label dropout follows Ho & Salimans 2022 (sec. 3.2).

Call convention: ``model(x, t, y=None)`` with ``x`` of shape [B, C, H, W], ``t`` a [B] tensor of timestep
indices (or a scalar), ``y`` a [B] LongTensor of labels in ``0..num_classes`` where ``num_classes`` is the
"null" label. Output: [B, out_channels * (2 if learn_sigma else 1), H, W]; with ``learn_sigma`` the first
``out_channels`` channels are the mean part and the rest the variance part.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .embeddings import SinusoidalTimestepEmbedding

__all__ = ["UNet", "ResBlock", "AttentionBlock", "GroupNorm32", "Downsample", "Upsample", "MaskDropout", "keep_mask"]

DOWNSAMPLE_PADDINGS = ("symmetric", "asymmetric")


def _zero_(module: nn.Module) -> nn.Module:
    """Zero all parameters: residual branches start as the identity (Ho et al. 2020 app. B, zero-init convs)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _autograd_records(h: torch.Tensor) -> bool:
    """Whether an op on ``h`` is recorded for backward (then ``h`` may be saved and must not be overwritten)."""
    return torch.is_grad_enabled() and h.requires_grad


def _silu_fresh(h: torch.Tensor) -> torch.Tensor:
    """SiLU of a tensor nothing else holds (a norm's output): in place when autograd does not need ``h``."""
    return F.silu(h, inplace=not _autograd_records(h))


def _add_fresh(h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``h + other`` for a tensor nothing else holds (a layer's output): in place when autograd does not need it.

    ``other`` must broadcast to ``h``'s shape. Mixed dtypes add out of place, so the result (values and dtype) is
    the same either way.
    """
    if other.dtype == h.dtype and not _autograd_records(h):
        return h.add_(other)
    return h + other


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (Wu & He 2018) that always normalises in float32 and returns the input dtype.

    Keeps statistics stable under bf16/fp16 autocast or a half-precision model; a no-op cast in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class Downsample(nn.Module):
    """3x3 stride-2 convolution.

    ``padding="symmetric"`` pads one pixel on every side (ADM); ``"asymmetric"`` pads only right/bottom, which is
    TensorFlow's 'SAME' for stride 2 on even sizes, i.e. Ho et al. 2020's original network (and diffusers'
    ``downsample_padding=0``).
    """

    def __init__(self, channels: int, padding: str = "symmetric") -> None:
        super().__init__()
        if padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"downsample_padding must be one of {DOWNSAMPLE_PADDINGS}, got {padding!r}")
        self.asymmetric = padding == "asymmetric"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution (Ho et al. 2020 app. B)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def keep_mask(u: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout keep mask ``[u >= p]`` as 0/1 floats in ``u``'s dtype, built from float ops only.

    ``min(sign(u - p) + 1, 1)`` equals ``[u >= p]`` exactly: an IEEE difference ``u - p`` is zero only when
    ``u == p``. A boolean mask would be the same numbers, but inductor's CPU kernels store a boolean element by
    element, which made the compiled training step of the ddpm-cifar10 UNet 10% slower (batch 8, 1 thread).
    ``u`` is consumed (modified in place).
    """
    return u.sub_(p).sign_().add_(1.0).clamp_(max=1.0)


class MaskDropout(nn.Dropout):
    """Inverted dropout (Srivastava et al. 2014): ``x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)``.

    Same distribution as ``nn.Dropout``; the mask ``m = [u >= p]`` (:func:`keep_mask`) comes from one float32
    uniform draw ``u``, which is markedly faster than ``bernoulli_`` on CPU, and is stored pre-scaled so backward
    is a single multiply.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = keep_mask(torch.rand_like(x, dtype=torch.float32), self.p)
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


class _Checkpointable(nn.Module):
    """Runs ``_forward`` under non-reentrant activation checkpointing when enabled and grads are on."""

    use_checkpoint: bool = False

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(self, *args: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ResBlock(_Checkpointable):
    """Wide-ResNet block with timestep conditioning (Ho et al. 2020 app. B; ADM for scale-shift and up/down).

    ``h = conv1(SiLU(GN(x)))``; then either ``h = GN(h + W e)`` or AdaGN ``h = GN(h) * (1 + s) + b`` with
    ``(s, b) = W e`` (Dhariwal & Nichol 2021 sec. 3); ``out = skip(x) + conv2(Dropout(SiLU(h)))`` with
    ``conv2`` zero-initialised and ``skip`` a 1x1 conv when the channel count changes.
    The embedding passed in is already ``SiLU(emb)`` (shared by all blocks, computed once per forward).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        *,
        use_scale_shift_norm: bool = False,
        resample: str | None = None,
        norm_groups: int = 32,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = GroupNorm32(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if use_scale_shift_norm else 1))
        self.norm2 = GroupNorm32(norm_groups, out_channels, eps=norm_eps)
        self.dropout = MaskDropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        # ADM's parameter-free resampling inside resblocks: 2x2 average pool / nearest x2.
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def _forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        h = _silu_fresh(self.norm1(x))
        if self.resample is not None:
            h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        e = self.emb_proj(emb_act)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # AdaGN (Dhariwal & Nichol 2021 sec. 3)
        else:
            h = self.norm2(_add_fresh(h, e))  # h + W*SiLU(emb) (Ho et al. 2020 app. B)
        h = self.conv2(self.dropout(_silu_fresh(h)))
        return _add_fresh(h, self.skip(x))


class AttentionBlock(_Checkpointable):
    """Spatial multi-head self-attention with a residual connection (Ho et al. 2020 app. B; Vaswani et al. 2017).

    ``out = x + proj(MHA(GN(x)))`` over the H*W tokens; q, k, v come from one fused linear layer, attention is
    ``softmax(q k^T / sqrt(d)) v`` via ``F.scaled_dot_product_attention`` (fused, numerically stable softmax),
    ``proj`` is zero-initialised.
    """

    def __init__(
        self, channels: int, num_heads: int = 1, *, norm_groups: int = 32, norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels={channels} not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = GroupNorm32(norm_groups, channels, eps=norm_eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero_(nn.Linear(channels, channels))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        n = height * width
        # [B, C, H, W] -> tokens [B, N, C]; a free view when x is channels_last.
        tokens = self.norm(x).reshape(b, c, n).transpose(1, 2)
        qkv = self.qkv(tokens).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, d]
        # softmax(q k^T / sqrt(d)) v  (Vaswani et al. 2017 eq. 1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))
        # tokens [B, N, C] -> [B, C, H, W] as a (channels_last-strided) view, no copy.
        return x + out.transpose(1, 2).unflatten(2, (height, width))


class EmbedSequential(nn.ModuleList):
    """A list of layers applied in order; ResBlocks also receive the (activated) conditioning embedding."""

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb_act) if isinstance(layer, ResBlock) else layer(x)
        return x


def _as_tuple(v: int | Iterable[int]) -> tuple[int, ...]:
    return (int(v),) if isinstance(v, int) else tuple(int(i) for i in v)


class UNet(nn.Module):
    """DDPM / ADM UNet ``eps_theta(x_t, t[, y])`` (Ho et al. 2020 app. B; Dhariwal & Nichol 2021).

    Args:
        in_channels / out_channels: image channels in and predicted channels out (before ``learn_sigma``).
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels.
        channel_mult: width multiplier per resolution level; a stride-2 downsample between levels.
        num_res_blocks: ResBlocks per level on the way down (``+1`` on the way up).
        attention_resolutions: feature-map sizes in pixels (e.g. ``(16,)``) that get self-attention.
        dropout: dropout inside ResBlocks.
        num_heads / head_channels: attention heads; ``head_channels > 0`` overrides with ``C // head_channels``.
        num_classes: enables class conditioning with ``num_classes + 1`` label embeddings; the extra index
            ``num_classes`` is the "null" label for classifier-free guidance (Ho & Salimans 2022).
        learn_sigma: double the output channels (IDDPM learned variance, Nichol & Dhariwal 2021).
        use_scale_shift_norm: AdaGN conditioning (ADM). resblock_updown: resample inside ResBlocks (ADM).
        image_size: input resolution (to place ``attention_resolutions``).
        class_dropout_prob: in training mode, labels are replaced by the null label with this probability.
        use_checkpoint: activation checkpointing of every ResBlock / AttentionBlock (saves memory).
        channels_last: keep weights and activations in NHWC memory format (default: measured faster for the
            convs on CPU (oneDNN) and CUDA (cuDNN); see ``diffusion_core.models.fast_defaults``). Numerics are
            those of the contiguous layout up to float rounding.
        norm_groups / norm_eps: GroupNorm groups and epsilon (DDPM's TF code used 1e-6).
        downsample_padding: ``"symmetric"`` (ADM) or ``"asymmetric"`` (TF 'SAME', DDPM original).
        flip_sin_to_cos / downscale_freq_shift / max_period: sinusoid convention, see ``timestep_embedding``.
        time_embed_dim: width of the timestep embedding (default ``4 * model_channels``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        model_channels: int = 128,
        channel_mult: Iterable[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Iterable[int] = (16,),
        dropout: float = 0.0,
        num_heads: int = 1,
        head_channels: int = -1,
        num_classes: int | None = None,
        learn_sigma: bool = False,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        image_size: int = 32,
        class_dropout_prob: float = 0.0,
        use_checkpoint: bool = False,
        channels_last: bool = True,
        norm_groups: int = 32,
        norm_eps: float = 1e-5,
        downsample_padding: str = "symmetric",
        flip_sin_to_cos: bool = True,
        downscale_freq_shift: float = 0.0,
        max_period: float = 10000.0,
        time_embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        channel_mult = _as_tuple(channel_mult)
        attention_resolutions = _as_tuple(attention_resolutions)
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if class_dropout_prob > 0 and num_classes is None:
            raise ValueError("class_dropout_prob > 0 needs num_classes")
        if image_size % 2 ** (len(channel_mult) - 1) != 0:
            raise ValueError(f"image_size={image_size} not divisible by 2^{len(channel_mult) - 1}")
        if downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(
                f"downsample_padding must be one of {DOWNSAMPLE_PADDINGS}, got {downsample_padding!r}"
            )
        self._config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "out_channels": int(out_channels),
            "model_channels": int(model_channels),
            "channel_mult": list(channel_mult),
            "num_res_blocks": int(num_res_blocks),
            "attention_resolutions": list(attention_resolutions),
            "dropout": float(dropout),
            "num_heads": int(num_heads),
            "head_channels": int(head_channels),
            "num_classes": None if num_classes is None else int(num_classes),
            "learn_sigma": bool(learn_sigma),
            "use_scale_shift_norm": bool(use_scale_shift_norm),
            "resblock_updown": bool(resblock_updown),
            "image_size": int(image_size),
            "class_dropout_prob": float(class_dropout_prob),
            "use_checkpoint": bool(use_checkpoint),
            "channels_last": bool(channels_last),
            "norm_groups": int(norm_groups),
            "norm_eps": float(norm_eps),
            "downsample_padding": str(downsample_padding),
            "flip_sin_to_cos": bool(flip_sin_to_cos),
            "downscale_freq_shift": float(downscale_freq_shift),
            "max_period": float(max_period),
            "time_embed_dim": None if time_embed_dim is None else int(time_embed_dim),
        }
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.image_size = image_size
        self.class_dropout_prob = class_dropout_prob
        self.channels_last = channels_last

        emb_dim = time_embed_dim or 4 * model_channels
        norm = {"norm_groups": norm_groups, "norm_eps": norm_eps}
        res_kw = {"use_scale_shift_norm": use_scale_shift_norm, **norm}

        def heads(ch: int) -> int:
            if head_channels > 0:
                if ch % head_channels:
                    raise ValueError(f"channels={ch} not divisible by head_channels={head_channels}")
                return ch // head_channels
            return num_heads

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, resample=resample, **res_kw)

        self.time_embed = SinusoidalTimestepEmbedding(
            model_channels, emb_dim, max_period, flip_sin_to_cos, downscale_freq_shift
        )
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        ch, size = model_channels, image_size
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if size in attention_resolutions:
                    layers.append(AttentionBlock(ch, heads(ch), **norm))
                self.down.append(EmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, "down") if resblock_updown else Downsample(ch, downsample_padding)
                self.down.append(EmbedSequential([down]))
                skip_channels.append(ch)
                size //= 2

        self.mid = EmbedSequential([res(ch, ch), AttentionBlock(ch, heads(ch), **norm), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if size in attention_resolutions:
                    layers.append(AttentionBlock(ch, heads(ch), **norm))
                if level != 0 and i == num_res_blocks:
                    layers.append(res(ch, ch, "up") if resblock_updown else Upsample(ch))
                    size *= 2
                self.up.append(EmbedSequential(layers))

        self.out_norm = GroupNorm32(norm_groups, ch, eps=norm_eps)
        self.out_conv = _zero_(nn.Conv2d(ch, out_channels * (2 if learn_sigma else 1), 3, padding=1))

        self.set_gradient_checkpointing(use_checkpoint)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ config / presets
    @property
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``UNet.from_config(unet.config)`` rebuilds the architecture."""
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> UNet:
        """Build from a dict (e.g. ``unet.config``) or any object with ``model_dump()`` (pydantic)."""
        if hasattr(config, "model_dump"):
            config = config.model_dump()
        return cls(**dict(config))

    @classmethod
    def ddpm_cifar10(cls, **overrides: Any) -> UNet:
        """Ho et al. 2020's CIFAR-10 network (35,746,307 parameters); matches diffusers' google/ddpm-cifar10-32."""
        cfg: dict[str, Any] = {
            "in_channels": 3,
            "out_channels": 3,
            "model_channels": 128,
            "channel_mult": (1, 2, 2, 2),
            "num_res_blocks": 2,
            "attention_resolutions": (16,),
            "dropout": 0.1,
            "num_heads": 1,
            "image_size": 32,
            "norm_eps": 1e-6,
            "downsample_padding": "asymmetric",
            "flip_sin_to_cos": False,
            "downscale_freq_shift": 1.0,
        }
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def quickstart(
        cls, image_size: int = 16, in_channels: int = 1, num_classes: int | None = 10, **overrides: Any
    ) -> UNet:
        """Small class-conditional UNet (~1.1M parameters at the defaults) that trains in minutes on a CPU.

        One ResBlock per level: on 2 CPU cores it trains ~1.4x faster than two (105 vs 76 images/s per thread
        at batch 64, 16x16) and gives recognisable digits within the quickstart's budget."""
        cfg: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": in_channels,
            "model_channels": 32,
            "channel_mult": (1, 2, 2),
            "num_res_blocks": 1,
            "attention_resolutions": (image_size // 2,),
            "dropout": 0.0,
            "num_heads": 2,
            "num_classes": num_classes,
            "image_size": image_size,
        }
        cfg.update(overrides)
        return cls(**cfg)

    # ------------------------------------------------------------------ options
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Toggle activation checkpointing of every ResBlock and AttentionBlock."""
        self._config["use_checkpoint"] = bool(enabled)
        for m in self.modules():
            if isinstance(m, _Checkpointable):
                m.use_checkpoint = bool(enabled)

    @property
    def null_label(self) -> int | None:
        """Index of the unconditional label (``num_classes``), or None for an unconditional model."""
        return self.num_classes

    # ------------------------------------------------------------------ forward
    def _labels(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        assert self.num_classes is not None
        if y is None:  # unconditional call of a conditional model -> null label for every row
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if self.training and self.class_dropout_prob > 0:
            # Classifier-free guidance training: drop labels to the null label (Ho & Salimans 2022, alg. 1).
            drop = torch.rand(y.shape[0], device=y.device) < self.class_dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return y

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int | float, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict eps (or x0 / v) for noisy images ``x`` [B, C, H, W] at timesteps ``t`` with labels ``y``."""
        batch = x.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x.device)
        if t.ndim == 0 or t.shape[0] != batch:
            t = t.reshape(-1).expand(batch)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        emb = self.time_embed(t)
        if self.label_embed is not None:
            emb = emb + self.label_embed(self._labels(y, batch, x.device))
        elif y is not None:
            raise ValueError("y was given but the model is unconditional (num_classes=None)")
        emb_act = F.silu(emb)  # every ResBlock applies SiLU before its projection; compute it once

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb_act)
            skips.append(h)
        h = self.mid(h, emb_act)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb_act)
        return self.out_conv(_silu_fresh(self.out_norm(h)))
