"""Tutorial-style faces (`add_noise`, `set_timesteps`, `step`) over the same GaussianDiffusion core.

    sched = NoiseScheduler(1000, "linear")                   # or DDIMNoiseScheduler(...)
    x_t = sched.add_noise(x0, noise, t)                      # training
    sched.set_timesteps(50)
    for t in sched.timesteps:                                # sampling, original step indices, decreasing
        x, x0_hat = sched.step(model(x, t), t, x)

No math lives here: add_noise is `q_sample`, step is `p_sample` (or `ddim_sample`) with the given model output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .respace import original_num_steps
from .rng import GeneratorLike
from .samplers import respaced
from .schedules import get_named_beta_schedule

__all__ = ["StepOutput", "NoiseScheduler", "DDPMNoiseScheduler", "DDIMNoiseScheduler"]

_PREDICTION = {"epsilon": ModelMeanType.EPSILON, "sample": ModelMeanType.START_X,
               "v_prediction": ModelMeanType.VELOCITY}
_VARIANCE = {"fixed_small": ModelVarType.FIXED_SMALL, "fixed_large": ModelVarType.FIXED_LARGE,
             "learned": ModelVarType.LEARNED, "learned_range": ModelVarType.LEARNED_RANGE}


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class NoiseScheduler:
    """A scheduler object holding a GaussianDiffusion.

    prediction_type: "epsilon" | "sample" | "v_prediction"; variance_type: "fixed_small" | "fixed_large" |
    "learned" | "learned_range"; sampler: "ddpm" (ancestral) or "ddim". Pass `diffusion=` to wrap an existing one.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        sampler: str = "ddpm",
        *,
        diffusion: GaussianDiffusion | None = None,
    ):
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        if diffusion is None:
            if prediction_type not in _PREDICTION:
                raise ValueError(f"prediction_type must be one of {', '.join(_PREDICTION)}")
            if variance_type not in _VARIANCE:
                raise ValueError(f"variance_type must be one of {', '.join(_VARIANCE)}")
            diffusion = GaussianDiffusion(
                betas=get_named_beta_schedule(beta_schedule, num_train_timesteps),
                model_mean_type=_PREDICTION[prediction_type],
                model_var_type=_VARIANCE[variance_type],
                loss_type=LossType.MSE,
            )
        self.diffusion = diffusion
        self.clip_sample = clip_sample
        self.sampler = sampler
        self.num_train_timesteps = original_num_steps(diffusion)
        self.set_timesteps(self.num_train_timesteps)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (`GaussianDiffusion.q_sample`); t: int or LongTensor [B]."""
        return self.diffusion.q_sample(x0, t, noise=noise)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Use `num_inference_steps` of the training steps (respaced as the shared sampler interface does)."""
        self._active = respaced(self.diffusion, self.sampler, num_inference_steps)
        keep = getattr(self._active, "timestep_map", None)
        keep = torch.arange(self.num_train_timesteps) if keep is None else keep
        self.timesteps = keep.flip(0).clone()
        self._index = {int(s): k for k, s in enumerate(keep.tolist())}

    def step(
        self,
        model_output: torch.Tensor,
        t,
        x_t: torch.Tensor,
        *,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        generator: GeneratorLike = None,
    ) -> StepOutput:
        """(x_{prev}, predicted x0) for original step t (one of `self.timesteps`) given the model's output at x_t."""
        t = torch.as_tensor(t).flatten()
        try:
            k = torch.tensor([self._index[int(s)] for s in t.tolist()], dtype=torch.long, device=x_t.device)
        except KeyError as err:
            raise ValueError(f"timestep {err.args[0]} is not one of the scheduler's timesteps") from None
        if k.numel() == 1:
            k = k.expand(x_t.shape[0])

        def model(*_args, **_kwargs):
            return model_output
        if self.sampler == "ddim":
            out = self._active.ddim_sample(model, x_t, k, clip_denoised=self.clip_sample, eta=eta, noise=noise,
                                           generator=generator)
        else:
            out = self._active.p_sample(model, x_t, k, clip_denoised=self.clip_sample, noise=noise,
                                        generator=generator)
        return StepOutput(out["sample"], out["pred_xstart"])


class DDPMNoiseScheduler(NoiseScheduler):
    """NoiseScheduler with ancestral (DDPM) steps."""

    def __init__(self, *args, **kwargs):
        kwargs["sampler"] = "ddpm"
        super().__init__(*args, **kwargs)


class DDIMNoiseScheduler(NoiseScheduler):
    """NoiseScheduler with DDIM steps (`step(..., eta=)`)."""

    def __init__(self, *args, **kwargs):
        kwargs["sampler"] = "ddim"
        super().__init__(*args, **kwargs)
