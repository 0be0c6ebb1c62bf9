"""Image conversions shared by train, evaluate, serve and the CLI (PIL + numpy only, no torchvision)."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import torch
from PIL import Image

# DDPM's data scaling (Ho et al. 2020, Sec. 3.3): uint8 pixels p -> p / 127.5 - 1 in [-1, 1].
NORMALISATION = "pixels / 127.5 - 1 (range [-1, 1])"


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) tensor -> float32 in [-1, 1], same shape (the one normalisation; see NORMALISATION)."""
    return pixels.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B,C,H,W] -> uint8 [B,H,W,C] (the inverse of :func:`from_uint8`)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def to_pil(array: np.ndarray) -> Image.Image:
    """uint8 [H,W,C] with C in {1,3} -> PIL image (L or RGB)."""
    return Image.fromarray(array[..., 0], mode="L") if array.shape[-1] == 1 else Image.fromarray(array, mode="RGB")


# Grids logged for people (MLflow's image viewer, README) are at least this wide: 16 tiles of 8-32 px are unreadable.
READABLE_WIDTH = 256


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, min_width: int = 0) -> Image.Image:
    """Tile a batch in [-1, 1] into one PIL image, ``nrow`` images per row (default: about square).

    With ``min_width`` the grid is enlarged by the smallest integer factor k with ``k * width >= min_width``,
    nearest neighbour, so every pixel becomes a k x k block (no interpolated values).
    """
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = arr[i]
    return to_pil(upscale_nearest(grid, min_width))


def upscale_nearest(array: np.ndarray, min_width: int) -> np.ndarray:
    """uint8 [H,W,C] repeated k times along H and W, k = max(1, ceil(min_width / W))."""
    k = max(1, math.ceil(min_width / array.shape[1]))
    return array if k == 1 else np.repeat(np.repeat(array, k, axis=0), k, axis=1)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def to_png_b64(images: torch.Tensor) -> list[str]:
    """Each image of a [-1, 1] batch as a base64-encoded PNG string."""
    return [base64.b64encode(png_bytes(to_pil(a))).decode("ascii") for a in to_uint8(images)]


def from_png_b64(data: str) -> np.ndarray:
    """base64 PNG -> uint8 array [H,W] (L) or [H,W,3] (RGB)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
