"""diffusion_core: Gaussian-diffusion math (DDPM / IDDPM / DDIM / DPM-Solver++), pure torch.

One coherent core with guided-diffusion semantics: schedules (beta and sigma views), the GaussianDiffusion
process, timestep respacing, samplers behind one interface, guidance, training-time samplers, and thin
tutorial-style faces in `diffusion_core.simple`.  Imports only torch / numpy / tqdm.
"""

from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .guidance import ClassifierFreeGuidance, classifier_cond_fn, dynamic_threshold
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from .respace import SpacedDiffusion, space_timesteps
from .samplers import SAMPLERS, dpm_solver_sample, sample, sample_progressive
from .schedules import (
    BETA_SCHEDULES,
    Schedule,
    ScheduleCosine,
    ScheduleDDPM,
    ScheduleLDM,
    ScheduleLogLinear,
    betas_for_alpha_bar,
    get_named_beta_schedule,
    karras_sigmas,
    rescale_zero_terminal_snr,
)
from .script_util import create_diffusion

__all__ = [
    "BETA_SCHEDULES",
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "GaussianDiffusion",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "Schedule",
    "ScheduleCosine",
    "ScheduleDDPM",
    "ScheduleLDM",
    "ScheduleLogLinear",
    "ScheduleSampler",
    "SpacedDiffusion",
    "UniformSampler",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "classifier_cond_fn",
    "create_diffusion",
    "create_named_schedule_sampler",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_sample",
    "dynamic_threshold",
    "get_named_beta_schedule",
    "karras_sigmas",
    "mean_flat",
    "normal_kl",
    "rescale_zero_terminal_snr",
    "sample",
    "sample_progressive",
    "space_timesteps",
]
