"""`create_diffusion`: DiT's factory (Peebles & Xie 2023) with a v-prediction switch."""

from __future__ import annotations

from collections.abc import Iterable

from .gaussian_diffusion import LossType, ModelMeanType, ModelVarType
from .respace import SpacedDiffusion, space_timesteps
from .schedules import get_named_beta_schedule

__all__ = ["create_diffusion"]


def create_diffusion(
    timestep_respacing: str | Iterable[int] | None = "",
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
    predict_v: bool = False,
    snr_gamma: float | None = None,
) -> SpacedDiffusion:
    """Build a SpacedDiffusion the way DiT does.

    loss: RESCALED_KL if use_kl, else RESCALED_MSE if rescale_learned_sigmas, else MSE;
    mean: EPSILON, or START_X (predict_xstart) or VELOCITY (predict_v);
    variance: LEARNED_RANGE if learn_sigma, else FIXED_SMALL (sigma_small) / FIXED_LARGE;
    timestep_respacing: "" / None for all `diffusion_steps`, else as `space_timesteps` ("ddim50", "250", [..]).
    snr_gamma: optional min-SNR-gamma MSE weighting.
    """
    if predict_xstart and predict_v:
        raise ValueError("predict_xstart and predict_v are mutually exclusive")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if predict_v:
        mean_type = ModelMeanType.VELOCITY
    elif predict_xstart:
        mean_type = ModelMeanType.START_X
    else:
        mean_type = ModelMeanType.EPSILON
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        snr_gamma=snr_gamma,
    )
