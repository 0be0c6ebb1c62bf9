"""An analytic test problem: data x0 ~ N(mu, s^2) elementwise, for which every optimal predictor is closed form.

With x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, (x0, eps, x_t) are jointly Gaussian and
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)
    E[x0  | x_t] = mu + s^2 sqrt(ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)
    E[v   | x_t] = sqrt(ab) E[eps | x_t] - sqrt(1 - ab) E[x0 | x_t]
The probability-flow ODE in x~ = x / sqrt(ab), sigma^2 = 1/ab - 1 is dx~/dsigma = (x~ - mu) sigma / (s^2 + sigma^2),
so x~(sigma) - mu = (x~_T - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2)) exactly.
"""

from __future__ import annotations

import torch


class GaussianDataModel:
    """The Bayes-optimal model for Gaussian data. kind: eps | x0 | v; learned_sigma appends C zero channels."""

    def __init__(self, mu: torch.Tensor, s: torch.Tensor, alphas_cumprod: torch.Tensor, kind: str = "eps",
                 learned_sigma: bool = False):
        self.mu, self.s, self.ab = mu, s, alphas_cumprod
        self.kind, self.learned_sigma = kind, learned_sigma
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_kwargs) -> torch.Tensor:
        self.calls.append(t.clone())
        ab = self.ab[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        mu, s2 = self.mu.to(x.dtype), (self.s**2).to(x.dtype)
        resid = x - ab.sqrt() * mu
        denom = ab * s2 + 1 - ab
        eps = (1 - ab).sqrt() * resid / denom
        x0 = mu + s2 * ab.sqrt() * resid / denom
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.kind]
        if self.learned_sigma:
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out

    def ode_endpoint(self, x_T: torch.Tensor, ab_T: float, ab_end: float) -> torch.Tensor:
        """Exact ODE solution from x_T at alpha_bar ab_T to ab_end, then the posterior mean E[x0 | x_end]
        (what DDIM / DPM-Solver return as their final x0)."""
        mu, s2 = self.mu.to(x_T.dtype), (self.s**2).to(x_T.dtype)
        sig2_T, sig2_e = 1 / ab_T - 1, 1 / ab_end - 1
        y_T = x_T / ab_T**0.5 - mu
        y_e = y_T * ((s2 + sig2_e) / (s2 + sig2_T)).sqrt()
        return mu + s2 / (s2 + sig2_e) * y_e
