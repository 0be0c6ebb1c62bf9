"""Reproducible Gaussian noise.

`generator` is either one `torch.Generator` (the whole tensor is drawn from it, exactly like `torch.randn`) or a
list of generators, one per batch row: row i is drawn from `generator[i]`, rows in order.  With a list, a row's
noise depends only on its own generator, so a request gives the same samples whether it is run alone or batched
with others.  Noise is drawn on the generator's device and then moved, so a CPU generator reproduces the same
numbers whatever device the sampler runs on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


def _draw(shape: Sequence[int], generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    out = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return out.to(device) if device is not None else out


def randn(
    shape: Sequence[int],
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal tensor of `shape`; see the module docstring for the `generator` contract."""
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, (list, tuple)):
        if len(shape) == 0 or len(generator) != shape[0]:
            raise ValueError(
                f"a list of generators must have one generator per batch row: got {len(generator)} "
                f"generators for shape {shape}"
            )
        rows = [_draw(shape[1:], g, device, dtype) for g in generator]
        return torch.stack(rows, dim=0)
    return _draw(shape, generator, device, dtype)


def randn_like(x: torch.Tensor, generator: GeneratorLike = None) -> torch.Tensor:
    """`randn(x.shape, generator, x.device, x.dtype)`."""
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def randint(
    high: int, size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Uniform integers in [0, high) as a LongTensor [size], drawn from one generator (or the global RNG)."""
    if generator is None:
        return torch.randint(0, high, (size,), device=device)
    return torch.randint(0, high, (size,), generator=generator, device=generator.device).to(device)
