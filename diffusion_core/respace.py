"""Timestep respacing: run a diffusion trained with T steps on a subset of those steps (Nichol & Dhariwal 2021, Sec. 4).

Keeping steps S = {s_0 < s_1 < ...} of the original process and re-deriving betas from alpha_bar at those steps,
    beta'_k = 1 - alpha_bar_{s_k} / alpha_bar_{s_{k-1}}     (alpha_bar_{s_{-1}} = 1),
gives a process with exactly the original alpha_bar at every kept step.  The model is still called with the
original step indices s_k.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .gaussian_diffusion import GaussianDiffusion

__all__ = ["space_timesteps", "SpacedDiffusion", "base_diffusion", "original_num_steps"]


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int]) -> set[int]:
    """Which original steps to keep.

    - "ddimN": the steps 0, k, 2k, ... with the integer stride k that yields exactly N steps (DDIM's spacing);
      ValueError when no stride does.
    - "10,15,20" or [10, 15, 20]: split 0..T-1 into len(counts) near-equal sections (earlier sections take the
      remainder) and keep counts[i] evenly spaced steps (rounded, first and last included) from section i.
    """
    T = int(num_timesteps)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, T):
                if len(range(0, T, stride)) == want:
                    return set(range(0, T, stride))
            if want == 1 or want == T:
                return {0} if want == 1 else set(range(T))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride from {T} steps")
        section_counts = [int(x) for x in section_counts.split(",") if x.strip()]
    counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("section_counts is empty")
    base, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        if count < 1:
            raise ValueError(f"every section needs at least one step, got {count}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        pos = 0.0
        for _ in range(count):  # accumulate the float stride (guided-diffusion's rounding, ties to even)
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


class _WrappedModel:
    """Calls `model` with the original step index timestep_map[t] instead of the spaced index t."""

    def __init__(self, model: Callable, timestep_map: torch.Tensor, original_num_steps: int):
        self.model = model
        self.timestep_map = timestep_map
        self.original_num_steps = original_num_steps

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        if self.timestep_map.device != t.device:
            self.timestep_map = self.timestep_map.to(t.device)
        return self.model(x, self.timestep_map[t], **kwargs)

    def parameters(self):
        params = getattr(self.model, "parameters", None)
        return params() if callable(params) else iter(())


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps `use_timesteps` of the process given by `betas`.

    Index k of this diffusion corresponds to original step `timestep_map[k]`; the model (and cond_fn) receive the
    original indices.  `original_betas` keeps the base schedule so samplers can respace from it.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        base = GaussianDiffusion(**kwargs)
        keep = sorted({int(s) for s in use_timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= base.num_timesteps:
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{base.num_timesteps - 1}")
        self.use_timesteps = set(keep)
        self.original_num_steps = base.num_timesteps
        self.original_betas = base.betas
        ab = base.alphas_cumprod[keep]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        # beta'_k = 1 - ab_{s_k} / ab_{s_{k-1}}   (Nichol & Dhariwal 2021, Sec. 4)
        kwargs["betas"] = 1.0 - ab / ab_prev
        self.timestep_map = torch.tensor(keep, dtype=torch.long)
        super().__init__(**kwargs)

    def _wrap_model(self, model):
        if model is None or isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.original_num_steps)

    def _mapped_rows(self, batch: int, device: torch.device) -> torch.Tensor:
        """[num_timesteps, batch] LongTensor whose row k is timestep_map[k] for every row (cached per shape)."""
        key = ("mapped_t", batch, device)
        rows = self._cache.get(key)
        if rows is None:
            with torch.inference_mode(False):
                rows = self._cache[key] = self.timestep_map.to(device).repeat_interleave(batch).view(-1, batch)
        return rows

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                        step_index: int | None = None, **kwargs):
        if step_index is None or model is None or isinstance(model, _WrappedModel):
            model = self._wrap_model(model)
        else:  # every row is at step_index: the original step is a cached row, not an index kernel per step
            inner, mapped = model, self._mapped_rows(x.shape[0], x.device)[step_index]
            model = lambda x_, _t, **kw: inner(x_, mapped, **kw)  # noqa: E731
        return super().p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs, step_index, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)


def original_num_steps(diffusion: GaussianDiffusion) -> int:
    """T of the process the model was trained on (the base of a SpacedDiffusion)."""
    return int(getattr(diffusion, "original_num_steps", diffusion.num_timesteps))


def base_diffusion(diffusion: GaussianDiffusion) -> GaussianDiffusion:
    """The unspaced diffusion (original betas, same types) of `diffusion`; itself if it is not spaced."""
    if not isinstance(diffusion, SpacedDiffusion):
        return diffusion
    cached = diffusion.__dict__.get("_base_diffusion")
    if cached is None:
        cached = GaussianDiffusion(betas=diffusion.original_betas, **diffusion.config)
        diffusion.__dict__["_base_diffusion"] = cached
    return cached
