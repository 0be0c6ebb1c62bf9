"""Grid tiling and nearest-neighbour enlargement (pipelines.images)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.images import READABLE_WIDTH, from_png_b64, make_grid, png_bytes, to_png_b64, to_uint8


def batch(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, size, size, generator=g) * 2 - 1


def test_grid_without_min_width_keeps_one_pixel_per_pixel():
    x = batch(16, 3, 8)
    grid = np.asarray(make_grid(x))
    assert grid.shape == (4 * 10 + 2, 4 * 10 + 2, 3)  # 4 x 4 tiles of 8 px, 2 px padding
    tiles = to_uint8(x)
    assert np.array_equal(grid[2:10, 2:10], tiles[0]) and np.array_equal(grid[12:20, 32:40], tiles[7])
    assert grid[0].max() == 0 and grid[:, 1].max() == 0  # padding stays black


@pytest.mark.parametrize("b,c,size", [(16, 3, 8), (16, 1, 32), (3, 3, 32), (1, 1, 8)])
def test_min_width_upscales_by_an_integer_factor_nearest_neighbour(b, c, size):
    x = batch(b, c, size, seed=b + size)
    small = np.asarray(make_grid(x))
    big = np.asarray(make_grid(x, min_width=READABLE_WIDTH))
    k = -(-READABLE_WIDTH // small.shape[1])  # smallest integer factor reaching the width
    assert big.shape[:2] == (small.shape[0] * k, small.shape[1] * k)
    assert big.shape[1] >= READABLE_WIDTH and (k - 1) * small.shape[1] < READABLE_WIDTH
    # Oracle: PIL's own nearest-neighbour resize of the small grid, and every k x k block constant.
    pil = Image.fromarray(small).resize((small.shape[1] * k, small.shape[0] * k), Image.Resampling.NEAREST)
    assert np.array_equal(big, np.asarray(pil))
    blocks = big.reshape(small.shape[0], k, small.shape[1], k, *big.shape[2:])
    assert np.array_equal(blocks.min(axis=(1, 3)), small) and np.array_equal(blocks.max(axis=(1, 3)), small)


def test_wide_grid_is_not_enlarged():
    x = batch(4, 3, 32)
    assert make_grid(x, nrow=4, min_width=64).size == make_grid(x, nrow=4).size == (4 * 34 + 2, 34 + 2)


def test_png_round_trip_is_lossless():
    x = batch(2, 3, 8)
    assert all(np.array_equal(from_png_b64(s), a) for s, a in zip(to_png_b64(x), to_uint8(x), strict=True))
    grid = make_grid(x, min_width=READABLE_WIDTH)
    assert Image.open(io.BytesIO(png_bytes(grid))).size == grid.size
