"""Discrete-time Gaussian diffusion (DDPM / Improved DDPM / DDIM), guided-diffusion semantics.

Conventions: t is a LongTensor [B] of step indices 0..T-1 (0 = last denoising step); the model is called as
`model(x_t, t, **model_kwargs)` and returns C channels (eps, x0, x_{t-1} mean or v) or 2C with a learned variance
(first C = mean part, last C = variance part).  All schedule buffers are float64 and cast to the input's dtype
when extracted.

Speed: the sampling loops know that every row sits at the same step, so they pass ``step_index`` and the
per-step coefficients are read from cached 0-dim rows instead of being gathered per row; each product is the
same float operation, so results equal the gathered path. Each step runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .rng import GeneratorLike, randn

__all__ = ["ModelMeanType", "ModelVarType", "LossType", "GaussianDiffusion", "step_grad_mode", "plain_tensor"]

_F64 = torch.float64


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    PREVIOUS_X = "previous_x"  # the posterior mean of x_{t-1}
    START_X = "start_x"  # x_0
    EPSILON = "epsilon"  # the noise eps
    VELOCITY = "velocity"  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""

    LEARNED = "learned"  # the network outputs log variance
    FIXED_SMALL = "fixed_small"  # posterior variance beta_tilde_t
    FIXED_LARGE = "fixed_large"  # beta_t (beta_tilde_1 at t=0 for a finite log)
    LEARNED_RANGE = "learned_range"  # interpolate log beta_tilde_t .. log beta_t with v in [-1, 1]


class LossType(enum.Enum):
    MSE = "mse"  # MSE of the mean prediction (+ vb term when the variance is learned)
    RESCALED_MSE = "rescaled_mse"  # as MSE with the vb term scaled by T/1000 (Nichol & Dhariwal 2021, Sec. 3.1)
    KL = "kl"  # the variational bound
    RESCALED_KL = "rescaled_kl"  # the variational bound times T

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def _enum(cls, v):
    if isinstance(v, cls):
        return v
    if isinstance(v, str):
        for member in cls:
            if v.lower() in (member.value, member.name.lower()):
                return member
    raise ValueError(f"invalid {cls.__name__} {v!r}; valid: {', '.join(m.name for m in cls)}")


Model = Callable[..., torch.Tensor]


def step_grad_mode(cond_fn: Callable | None = None):
    """The grad mode of one sampling step: ``torch.inference_mode`` (no autograd bookkeeping at all), or
    ``torch.no_grad`` when a classifier-guidance ``cond_fn`` needs to enable autograd inside the step."""
    if cond_fn is not None:
        return torch.no_grad()
    return contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode()


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """x, or a normal copy of it if it is an inference tensor (those refuse in-place updates and autograd
    outside inference mode); the final images of the sampling loops go through this once."""
    return x.clone() if x.is_inference() else x


class GaussianDiffusion:
    """Utilities for training and sampling a discrete Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021).

    :param betas: [T] noise variances per step (converted to float64), each in (0, 1].
    :param model_mean_type / model_var_type / loss_type: enums (or their names as strings).
    :param snr_gamma: if set, weight the MSE term with min-SNR-gamma (Hang et al. 2023).
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type: ModelMeanType | str,
        model_var_type: ModelVarType | str,
        loss_type: LossType | str,
        snr_gamma: float | None = None,
    ):
        self.model_mean_type = _enum(ModelMeanType, model_mean_type)
        self.model_var_type = _enum(ModelVarType, model_var_type)
        self.loss_type = _enum(LossType, loss_type)
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        if self.snr_gamma is not None and self.model_mean_type is ModelMeanType.PREVIOUS_X:
            raise ValueError("min-SNR weighting is defined for EPSILON, START_X and VELOCITY predictions")
        betas = torch.as_tensor(betas, dtype=_F64).detach().cpu().flatten().clone()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a non-empty 1-D sequence with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.numel())
        self._cache: dict[tuple, torch.Tensor | list[torch.Tensor]] = {}  # device copies, per-step rows

        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod = ab
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=_F64), ab[:-1]])
        self.alphas_cumprod_next = torch.cat([ab[1:], torch.zeros(1, dtype=_F64)])
        self.sqrt_alphas_cumprod_prev = self.alphas_cumprod_prev.sqrt()
        self.sqrt_one_minus_alphas_cumprod_prev = (1.0 - self.alphas_cumprod_prev).sqrt()

        # q(x_t | x_0) = N(sqrt(ab) x0, (1 - ab) I)   (Ho et al. 2020, Eq. 4)
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.one_minus_alphas_cumprod = 1.0 - ab
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ab).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - ab)
        self.sqrt_recip_alphas_cumprod = (1.0 / ab).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ab - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0) = N(coef1 x0 + coef2 x_t, beta_tilde_t)   (Ho et al. 2020, Eq. 6-7)
        abp = self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - abp) / (1.0 - ab)
        # beta_tilde_0 = 0, so the log is clipped by repeating beta_tilde_1 (guided-diffusion convention)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * abp.sqrt() / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - abp) * alphas.sqrt() / (1.0 - ab)
        # FIXED_LARGE variance: beta_t, with beta_tilde_1 at t=0 (Ho et al. 2020, Sec. 3.2)
        self.fixed_large_variance = torch.cat([self.posterior_variance[1:2], betas[1:]])
        self.fixed_large_log_variance = torch.log(self.fixed_large_variance)
        self.log_betas = torch.log(betas)
        # signal-to-noise ratio ab / (1 - ab)   (Kingma et al. 2021, Eq. 2)
        self.snr = ab / (1.0 - ab)

    # ------------------------------------------------------------------ helpers
    @property
    def config(self) -> dict:
        """Constructor arguments other than betas (used to rebuild respaced copies)."""
        return {
            "model_mean_type": self.model_mean_type,
            "model_var_type": self.model_var_type,
            "loss_type": self.loss_type,
            "snr_gamma": self.snr_gamma,
        }

    def __getstate__(self) -> dict:
        # device copies are a cache: never pickle them (a CUDA copy would not load on a CPU-only worker)
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def _buffer(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The float64 buffer `name` cast to dtype on device (cached; casting before indexing is elementwise,
        so values equal casting after)."""
        key = (name, device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            arr = getattr(self, name)
            with torch.inference_mode(False):  # a normal tensor even when first asked for inside a sampling step
                if device.type == "mps":  # no float64 on MPS: cast on the CPU first
                    hit = arr.to(dtype=dtype).to(device)
                else:
                    hit = arr.to(device=device).to(dtype)
            self._cache[key] = hit
        return hit

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """buffer[t] in x.dtype, shaped [B, 1, ..., 1] to broadcast against x."""
        out = torch.index_select(self._buffer(name, t.device, x.dtype), 0, t)
        return out.view(t.shape[0], *((1,) * (x.ndim - 1)))

    def _std_buffer(self, logvar_name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """exp(0.5 * log_variance) per step in dtype, each value computed by the vectorised elementwise kernel
        (64 lanes per step), as p_sample's image-sized exp computes it (cached)."""
        key = ("std:" + logvar_name, device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            lv = self._buffer(logvar_name, device, dtype)
            with torch.inference_mode(False):
                hit = self._cache[key] = torch.exp(0.5 * lv[:, None].expand(-1, 64))[:, 0].contiguous()
        return hit

    def _coef(self, name: str, t: torch.Tensor, x: torch.Tensor, step_index: int | None) -> torch.Tensor:
        """The coefficient `name` at steps t, for broadcasting against x.

        Without step_index: buffer[t] shaped [B, 1, ..., 1]. With step_index (every row at that step): the 0-dim
        element buffer[step_index] in x.dtype on x.device, from a cached list of rows (no kernel, no host sync,
        cheaper to dispatch than a Python scalar); x * it is the same float product as x * buffer[t]."""
        if step_index is None:
            return self._extract(name, t, x)
        key = ("rows:" + name, x.device, x.dtype)
        rows = self._cache.get(key)
        if rows is None:
            table = (self._std_buffer(name[4:], x.device, x.dtype) if name.startswith("std:")
                     else self._buffer(name, x.device, x.dtype))
            with torch.inference_mode(False):
                rows = self._cache[key] = list(table.unbind(0))
        return rows[step_index]

    def _check_t(self, x: torch.Tensor, t) -> torch.Tensor:
        if (isinstance(t, torch.Tensor) and t.dtype == torch.long and t.ndim == 1 and t.device == x.device
                and t.shape[0] == x.shape[0]):
            return t
        t = torch.as_tensor(t).to(device=x.device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B]={x.shape[0]}, got {tuple(t.shape)}")
        return t

    @staticmethod
    def _model_device(model, noise: torch.Tensor | None, device):
        if noise is not None:
            return noise.device
        if device is not None:
            return torch.device(device)
        params = getattr(model, "parameters", None)
        if callable(params):
            for p in params():
                return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """(mean, variance, log_variance) of q(x_t | x_0) = N(sqrt(ab) x0, 1 - ab)   (Ho et al. 2020, Eq. 4)."""
        t = self._check_t(x_start, t)
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): sqrt(ab_t) x0 + sqrt(1 - ab_t) eps   (Ho et al. 2020, Eq. 4)."""
        t = self._check_t(x_start, t)
        if noise is None:
            noise = randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def _posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        step_index: int | None = None) -> torch.Tensor:
        # Ho et al. 2020, Eq. 7: coef1 x0 + coef2 x_t (t already validated)
        return (self._coef("posterior_mean_coef1", t, x_t, step_index) * x_start
                + self._coef("posterior_mean_coef2", t, x_t, step_index) * x_t)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(mean, variance, clipped log-variance) of q(x_{t-1} | x_t, x_0)   (Ho et al. 2020, Eq. 6-7)."""
        t = self._check_t(x_t, t)
        mean = self._posterior_mean(x_start, x_t, t)
        variance = self._extract("posterior_variance", t, x_t).expand(x_t.shape)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand(x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parameterisation conversions
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                                step_index: int | None = None) -> torch.Tensor:
        """x0 = x_t / sqrt(ab) - sqrt(1/ab - 1) eps   (inverse of Ho et al. 2020, Eq. 4)."""
        t = self._check_t(x_t, t)
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t, step_index) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t, step_index) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor,
                                step_index: int | None = None) -> torch.Tensor:
        """eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)   (inverse of Ho et al. 2020, Eq. 4).

        Equal to guided-diffusion's (x_t / sqrt(ab) - x0) / sqrt(1/ab - 1), written so that it stays finite at
        alpha_bar = 0 (zero-terminal-SNR schedules, Lin et al. 2023)."""
        t = self._check_t(x_t, t)
        return (x_t - self._coef("sqrt_alphas_cumprod", t, x_t, step_index) * pred_xstart) / self._coef(
            "sqrt_one_minus_alphas_cumprod", t, x_t, step_index
        )

    def predict_xstart_from_xprev(self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor,
                                  step_index: int | None = None) -> torch.Tensor:
        """x0 = (mu_{t-1} - coef2 x_t) / coef1, inverting the posterior mean   (Ho et al. 2020, Eq. 7)."""
        t = self._check_t(x_t, t)
        return (xprev - self._coef("posterior_mean_coef2", t, x_t, step_index) * x_t) / self._coef(
            "posterior_mean_coef1", t, x_t, step_index
        )

    def get_velocity(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ab) eps - sqrt(1 - ab) x0   (Salimans & Ho 2022, Sec. 4)."""
        t = self._check_t(x_start, t)
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * noise
            - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
        )

    def predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                              step_index: int | None = None) -> torch.Tensor:
        """x0 = sqrt(ab) x_t - sqrt(1 - ab) v   (Salimans & Ho 2022, App. D)."""
        t = self._check_t(x_t, t)
        return (
            self._coef("sqrt_alphas_cumprod", t, x_t, step_index) * x_t
            - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t, step_index) * v
        )

    def predict_eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - ab) x_t + sqrt(ab) v   (Salimans & Ho 2022, App. D)."""
        t = self._check_t(x_t, t)
        return (
            self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
            + self._extract("sqrt_alphas_cumprod", t, x_t) * v
        )

    def predict_v_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """v = (sqrt(ab) x_t - x0) / sqrt(1 - ab)   (inverse of predict_xstart_from_v)."""
        t = self._check_t(x_t, t)
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._extract(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        )

    # guided-diffusion spells these with a leading underscore
    _predict_xstart_from_eps = predict_xstart_from_eps
    _predict_eps_from_xstart = predict_eps_from_xstart
    _predict_xstart_from_xprev = predict_xstart_from_xprev

    # ------------------------------------------------------------------ reverse process
    def _learned_var(self) -> bool:
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
        step_index: int | None = None,
        *,
        posterior_mean: bool = True,
    ) -> dict:
        """Apply the model to get p(x_{t-1} | x_t) and the implied x0.

        Returns dict(mean, variance, log_variance, pred_xstart, extra) where extra is the raw variance output of
        a learned-variance model (else None).  `denoised_fn` is applied to x0 before `clip_denoised` clamps it
        to [-1, 1]; the mean is the posterior mean given that x0 (Ho et al. 2020, Eq. 7).
        `step_index`: the int every entry of t equals (the sampling loops pass it); coefficients then come from
        per-step tables (same values), and a fixed variance / log-variance is returned as an unexpanded 0-dim
        tensor. `posterior_mean=False` skips the mean (returned as None) for callers that use only x0 (DDIM).
        """
        model_kwargs = model_kwargs or {}
        t = self._check_t(x, t)
        B, C = x.shape[:2]
        model_output = model(x, t, **model_kwargs)
        if step_index is not None and model_output.dtype != x.dtype:
            # what the gathered x.dtype coefficients do implicitly (type promotion): compute in x.dtype
            model_output = model_output.to(x.dtype)
        extra = None

        if self._learned_var():
            if model_output.shape != (B, 2 * C, *x.shape[2:]):
                raise ValueError(
                    f"learned variance needs a model output of shape {(B, 2 * C, *x.shape[2:])}, "
                    f"got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)
            extra = var_values
            if self.model_var_type is ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                # Nichol & Dhariwal 2021, Eq. 15: log Sigma = v log beta + (1 - v) log beta_tilde, v = (out+1)/2
                min_log = self._coef("posterior_log_variance_clipped", t, x, step_index)
                max_log = self._coef("log_betas", t, x, step_index)
                frac = (var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if model_output.shape != x.shape:
                raise ValueError(
                    f"model output shape {tuple(model_output.shape)} != input shape {tuple(x.shape)} "
                    f"(model_var_type={self.model_var_type.name})"
                )
            if self.model_var_type is ModelVarType.FIXED_LARGE:
                var_buf, logvar_buf = "fixed_large_variance", "fixed_large_log_variance"
            else:
                var_buf, logvar_buf = "posterior_variance", "posterior_log_variance_clipped"
            if step_index is None:
                model_variance = self._extract(var_buf, t, x).expand(x.shape)
                model_log_variance = self._extract(logvar_buf, t, x).expand(x.shape)
            else:
                model_variance = self._coef(var_buf, t, x, step_index)
                model_log_variance = self._coef(logvar_buf, t, x, step_index)

        def process_xstart(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        mt = self.model_mean_type
        if mt is ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self.predict_xstart_from_xprev(x, t, model_output, step_index))
            model_mean = model_output
        else:
            if mt is ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            elif mt is ModelMeanType.EPSILON:
                pred_xstart = process_xstart(self.predict_xstart_from_eps(x, t, model_output, step_index))
            else:
                pred_xstart = process_xstart(self.predict_xstart_from_v(x, t, model_output, step_index))
            model_mean = self._posterior_mean(pred_xstart, x, t, step_index) if posterior_mean else None

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def condition_mean(self, cond_fn: Callable, p_mean_var: dict, x: torch.Tensor, t: torch.Tensor,
                       model_kwargs: dict | None = None) -> torch.Tensor:
        """Classifier guidance on the mean: mu + Sigma * grad_x log p(y | x_t)
        (Sohl-Dickstein et al. 2015; Dhariwal & Nichol 2021, Alg. 1). cond_fn returns the (scaled) gradient."""
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"] + p_mean_var["variance"] * gradient.to(p_mean_var["mean"].dtype)

    def condition_score(self, cond_fn: Callable, p_mean_var: dict, x: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict | None = None) -> dict:
        """Classifier guidance on the score: eps' = eps - sqrt(1 - ab) grad_x log p(y | x_t)
        (Song et al. 2021, score SDE; Dhariwal & Nichol 2021, Alg. 2). Returns a new p_mean_var dict."""
        t = self._check_t(x, t)
        ab = self._extract("alphas_cumprod", t, x)
        eps = self.predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - ab).sqrt() * cond_fn(x, t, **(model_kwargs or {})).to(eps.dtype)
        out = dict(p_mean_var)
        out["pred_xstart"] = self.predict_xstart_from_eps(x, t, eps)
        out["mean"] = self._posterior_mean(out["pred_xstart"], x, t)
        return out

    def _noise(self, x: torch.Tensor, noise: torch.Tensor | None, generator: GeneratorLike) -> torch.Tensor:
        if noise is not None:
            if noise.shape != x.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != sample shape {tuple(x.shape)}")
            return noise.to(device=x.device, dtype=x.dtype)
        return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        generator: GeneratorLike = None,
        step_index: int | None = None,
    ) -> dict:
        """One ancestral step x_{t-1} = mu + sigma z, no noise at t=0 (Ho et al. 2020, Alg. 2).

        `step_index`: see p_mean_variance. Returns dict(sample, pred_xstart)."""
        t = self._check_t(x, t)
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs, step_index=step_index)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        z = self._noise(x, noise, generator)  # drawn at t=0 too: the generator advances as in the batched path
        if step_index is None or out["log_variance"].ndim > 0:
            nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * z
        elif step_index == 0:
            sample = out["mean"]  # mu + 0 * sigma z
        else:
            logvar_buf = ("fixed_large_log_variance" if self.model_var_type is ModelVarType.FIXED_LARGE
                          else "posterior_log_variance_clipped")
            # sigma_t z with sigma_t = exp(0.5 log sigma_t^2)   (Ho et al. 2020, Alg. 2, line 4)
            sample = out["mean"] + self._coef("std:" + logvar_buf, t, x, step_index) * z
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop_timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        """[T, batch] LongTensor whose row i is the step tensor t = i (one allocation per loop; rows are views)."""
        return torch.arange(self.num_timesteps, device=device).repeat_interleave(batch).view(-1, batch)

    def _progress(self, indices: Sequence[int], progress: bool):
        if not progress:
            return indices
        from tqdm.auto import tqdm

        return tqdm(indices)

    def _initial(self, model, shape, noise, device, generator) -> torch.Tensor:
        device = self._model_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            return noise.to(device)
        return randn(shape, generator=generator, device=device, dtype=torch.float32)

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        device=None,
        progress: bool = False,
        generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T (= `noise` or fresh noise) down to x_0 (Ho et al. 2020, Alg. 2)."""
        final = None
        for out in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, generator=generator,
        ):
            final = out
        return plain_tensor(final["sample"])

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        device=None,
        progress: bool = False,
        generator: GeneratorLike = None,
    ) -> Iterator[dict]:
        """Yield p_sample's dict (plus "t", the step index) for every step T-1 .. 0.

        With a generator, x_T is drawn first, then one noise tensor per step (rows from their own generators
        when a list is given)."""
        img = self._initial(model, shape, noise, device, generator)
        ts = self._loop_timesteps(img.shape[0], img.device)
        for i in self._progress(list(range(self.num_timesteps))[::-1], progress):
            with step_grad_mode(cond_fn):
                out = self.p_sample(model, img, ts[i], clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs, generator=generator, step_index=i)
            out["t"] = i
            yield out
            img = out["sample"]

    # ------------------------------------------------------------------ DDIM
    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        generator: GeneratorLike = None,
        step_index: int | None = None,
    ) -> dict:
        """One DDIM step (Song et al. 2021, Eq. 12 with sigma_t(eta) from Eq. 16). Returns dict(sample, pred_xstart).

        eps is re-derived from the (clipped / guided) x0, so both stay consistent. No noise is drawn when eta == 0.
        `step_index`: see p_mean_variance.
        """
        t = self._check_t(x, t)
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs, step_index=step_index, posterior_mean=False)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"], step_index)
        if eta == 0 and noise is None:
            # Song et al. 2021, Eq. 12 with sigma = 0: sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps
            sample = (out["pred_xstart"] * self._coef("sqrt_alphas_cumprod_prev", t, x, step_index)
                      + self._coef("sqrt_one_minus_alphas_cumprod_prev", t, x, step_index) * eps)
            return {"sample": sample, "pred_xstart": out["pred_xstart"]}
        ab = self._extract("alphas_cumprod", t, x)
        ab_prev = self._extract("alphas_cumprod_prev", t, x)
        # Song et al. 2021, Eq. 16: sigma = eta sqrt((1 - ab_prev)/(1 - ab)) sqrt(1 - ab/ab_prev)
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        # Song et al. 2021, Eq. 12: sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
        sample = out["pred_xstart"] * ab_prev.sqrt() + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta != 0 or noise is not None:
            z = self._noise(x, noise, generator)
            nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            sample = sample + nonzero_mask * sigma * z
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
    ) -> dict:
        """Deterministic DDIM step t -> t+1 (the ODE run forward, for inversion/encoding; Song et al. 2021, Sec. 4.3)."""
        if eta != 0.0:
            raise ValueError("the reverse (encoding) ODE is only defined for eta = 0")
        t = self._check_t(x, t)
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        ab_next = self._extract("alphas_cumprod_next", t, x)
        # Song et al. 2021, Eq. 12 with eta = 0, stepping to ab_{t+1}
        sample = out["pred_xstart"] * ab_next.sqrt() + (1 - ab_next).sqrt() * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        progress: bool = False,
        stop_at: int | None = None,
    ) -> torch.Tensor:
        """Encode x_0 to the latent at step `stop_at` (default T-1) by running ddim_reverse_sample for t=0..stop_at-1."""
        stop = self.num_timesteps - 1 if stop_at is None else int(stop_at)
        img = x_start
        for i in self._progress(list(range(stop)), progress):
            t = torch.full((img.shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                img = self.ddim_reverse_sample(model, img, t, clip_denoised=clip_denoised,
                                               denoised_fn=denoised_fn, model_kwargs=model_kwargs)["sample"]
        return img

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        generator: GeneratorLike = None,
    ) -> torch.Tensor:
        """DDIM sampling over all steps of this diffusion (respace it for fewer steps)."""
        final = None
        for out in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator,
        ):
            final = out
        return plain_tensor(final["sample"])

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable | None = None,
        cond_fn: Callable | None = None,
        model_kwargs: dict | None = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        generator: GeneratorLike = None,
    ) -> Iterator[dict]:
        """Yield ddim_sample's dict (plus "t") for every step T-1 .. 0."""
        img = self._initial(model, shape, noise, device, generator)
        ts = self._loop_timesteps(img.shape[0], img.device)
        for i in self._progress(list(range(self.num_timesteps))[::-1], progress):
            with step_grad_mode(cond_fn):
                out = self.ddim_sample(model, img, ts[i], clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                       cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta, generator=generator,
                                       step_index=i)
            out["t"] = i
            yield out
            img = out["sample"]

    # ------------------------------------------------------------------ likelihood & losses
    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict:
        """One term of the variational bound in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t>0 and
        the discretized decoder NLL -log p(x_0|x_1) for t=0 (Ho et al. 2020, Eq. 5). Returns dict(output, pred_xstart)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def _mse_weight(self, t: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
        # Hang et al. 2023 (min-SNR-gamma), Sec. 3.4: w = min(snr, g) / snr for eps, min(snr, g) for x0,
        # min(snr, g) / (snr + 1) for v.
        snr = self._extract("snr", t, mse)
        clipped = snr.clamp(max=self.snr_gamma)
        if self.model_mean_type is ModelMeanType.EPSILON:
            return clipped / snr
        if self.model_mean_type is ModelMeanType.START_X:
            return clipped
        return clipped / (snr + 1)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        generator: GeneratorLike = None,
    ) -> dict:
        """Per-example training loss at steps t: dict(loss [B], and where they apply mse [B], vb [B]).

        MSE family: mse = mean_flat((target - prediction)^2) with target eps / x0 / posterior mean / v; with a
        learned variance the vb term is added with the mean output detached (Nichol & Dhariwal 2021, Sec. 3.1,
        L_hybrid), scaled by T/1000 for RESCALED_MSE.  With snr_gamma the MSE term entering `loss` is min-SNR
        weighted ("mse" stays unweighted). KL family: loss = vb (times T for RESCALED_KL).
        """
        model_kwargs = model_kwargs or {}
        t = self._check_t(x_start, t)
        noise = self._noise(x_start, noise, generator)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, torch.Tensor] = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type is LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, t, **model_kwargs)
        if self._learned_var():
            C = x_t.shape[1]
            if model_output.shape != (x_t.shape[0], 2 * C, *x_t.shape[2:]):
                raise ValueError(f"learned variance needs 2C={2 * C} output channels, got {tuple(model_output.shape)}")
            model_output, var_values = torch.split(model_output, C, dim=1)
            # the vb term trains only the variance: the mean output is detached
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *_a, **_k: frozen, x_start, x_t, t,
                                             clip_denoised=False)["output"]
            if self.loss_type is LossType.RESCALED_MSE:
                # the MSE term is an average over T terms, the vb one a single term (Nichol & Dhariwal 2021)
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        mt = self.model_mean_type
        if mt is ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif mt is ModelMeanType.START_X:
            target = x_start
        elif mt is ModelMeanType.EPSILON:
            target = noise
        else:
            target = self.get_velocity(x_start, noise, t)
        if model_output.shape != target.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} != target shape {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        mse = terms["mse"] if self.snr_gamma is None else terms["mse"] * self._mse_weight(t, terms["mse"])
        terms["loss"] = mse + terms["vb"] if "vb" in terms else mse
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example (Ho et al. 2020, L_T)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)
        return mean_flat(kl_prior) / math.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        progress: bool = False,
        generator: GeneratorLike = None,
    ) -> dict:
        """The full variational bound in bits/dim: dict(total_bpd [B], prior_bpd [B], vb [B,T], xstart_mse [B,T],
        mse [B,T]); as in guided-diffusion, column j holds step T-1-j (Ho et al. 2020, Eq. 5)."""
        B = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in self._progress(list(range(self.num_timesteps))[::-1], progress):
            t = torch.full((B,), i, device=x_start.device, dtype=torch.long)
            noise = randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        # guided-diffusion's layout: column j holds step T-1-j (the loop order)
        vb_t = torch.stack(vb, dim=1)
        xstart_mse_t = torch.stack(xstart_mse, dim=1)
        mse_t = torch.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb_t.sum(dim=1) + prior_bpd
        return {"total_bpd": total_bpd, "prior_bpd": prior_bpd, "vb": vb_t, "xstart_mse": xstart_mse_t, "mse": mse_t}
