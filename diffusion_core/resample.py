"""Timestep samplers for training: uniform, and importance sampling by the loss second moment.

`sample` returns (t, weights) with weights = 1 / (T p(t)) so that mean(weights * loss) is an unbiased estimate of
the uniform-t objective (Nichol & Dhariwal 2021, Sec. 3.3, Eq. 18).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "ScheduleSampler",
    "UniformSampler",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "create_named_schedule_sampler",
    "torch_distributed_all_gather",
]


def _num_timesteps(diffusion_or_T) -> int:
    return int(diffusion_or_T) if isinstance(diffusion_or_T, int) else int(diffusion_or_T.num_timesteps)


class ScheduleSampler(ABC):
    """A distribution over training steps 0..T-1, used for importance sampling of the loss."""

    num_timesteps: int

    @abstractmethod
    def weights(self) -> torch.Tensor:
        """Unnormalised non-negative float64 weights [T]."""

    def probabilities(self) -> torch.Tensor:
        w = self.weights()
        return w / w.sum()

    def sample(
        self, batch_size: int, device=None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t LongTensor [B], importance weights float32 [B] = 1 / (T p(t)))   (Nichol & Dhariwal 2021, Eq. 18)."""
        p = self.probabilities()
        kw = {} if generator is None else {"generator": generator}
        if generator is not None and generator.device != p.device:
            p = p.to(generator.device)
        idx = torch.multinomial(p, batch_size, replacement=True, **kw)
        weights = 1.0 / (len(p) * p[idx])
        return idx.to(device), weights.to(device=device, dtype=torch.float32)


class UniformSampler(ScheduleSampler):
    """t ~ Uniform{0..T-1}; all weights 1."""

    def __init__(self, diffusion_or_num_timesteps):
        self.num_timesteps = _num_timesteps(diffusion_or_num_timesteps)
        self._weights = torch.ones(self.num_timesteps, dtype=torch.float64)

    def weights(self) -> torch.Tensor:
        return self._weights


AllGather = Callable[[object], list]


def torch_distributed_all_gather(obj) -> list:
    """All-gather of a picklable object over the default torch.distributed group (imported lazily)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class LossAwareSampler(ScheduleSampler):
    """A sampler updated from observed losses. In a single process the local losses are used directly; pass
    `all_gather` (obj -> list of obj from every rank, e.g. `torch_distributed_all_gather`) to share them so
    every rank keeps identical state."""

    def __init__(self, all_gather: AllGather | None = None):
        self.all_gather = all_gather

    def update_with_local_losses(self, local_ts: torch.Tensor | Sequence[int], local_losses) -> None:
        """Record this rank's (t, loss) pairs, gathering from all ranks first when an all_gather is set."""
        ts = [int(t) for t in torch.as_tensor(local_ts).flatten().tolist()]
        losses = [float(v) for v in torch.as_tensor(local_losses).detach().flatten().tolist()]
        if len(ts) != len(losses):
            raise ValueError(f"{len(ts)} timesteps but {len(losses)} losses")
        if self.all_gather is None:
            self.update_with_all_losses(ts, losses)
            return
        gathered = self.all_gather((ts, losses))
        all_ts = [t for rank_ts, _ in gathered for t in rank_ts]
        all_losses = [v for _, rank_losses in gathered for v in rank_losses]
        self.update_with_all_losses(all_ts, all_losses)

    @abstractmethod
    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Update from the (t, loss) pairs of every rank (identical on all ranks)."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(E[L_t^2]) over the last `history_per_term` losses of each step, mixed with
    `uniform_prob` of the uniform distribution; uniform until every step has a full history
    (Nichol & Dhariwal 2021, Eq. 18)."""

    def __init__(
        self,
        diffusion_or_num_timesteps,
        history_per_term: int = 10,
        uniform_prob: float = 0.001,
        all_gather: AllGather | None = None,
    ):
        super().__init__(all_gather)
        self.num_timesteps = _num_timesteps(diffusion_or_num_timesteps)
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self._loss_history = torch.zeros(self.num_timesteps, self.history_per_term, dtype=torch.float64)
        self._loss_counts = torch.zeros(self.num_timesteps, dtype=torch.long)

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def weights(self) -> torch.Tensor:
        if not self._warmed_up():
            return torch.ones(self.num_timesteps, dtype=torch.float64)
        # Nichol & Dhariwal 2021, Eq. 18: p_t ~ sqrt(E[L_t^2])
        w = (self._loss_history**2).mean(dim=-1).sqrt()
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        for t, loss in zip(ts, losses, strict=True):
            t = int(t)
            n = int(self._loss_counts[t])
            if n == self.history_per_term:  # full: drop the oldest
                self._loss_history[t, :-1] = self._loss_history[t, 1:].clone()
                self._loss_history[t, -1] = float(loss)
            else:
                self._loss_history[t, n] = float(loss)
                self._loss_counts[t] += 1

    def state_dict(self) -> dict:
        """Everything needed to resume: histories, counts and hyper-parameters (tensors are copies)."""
        return {
            "num_timesteps": self.num_timesteps,
            "history_per_term": self.history_per_term,
            "uniform_prob": self.uniform_prob,
            "loss_history": self._loss_history.clone(),
            "loss_counts": self._loss_counts.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`; ValueError if it was made for a different T or history length."""
        if int(state["num_timesteps"]) != self.num_timesteps or int(state["history_per_term"]) != self.history_per_term:
            raise ValueError(
                f"state is for T={state['num_timesteps']}, history={state['history_per_term']}; this sampler has "
                f"T={self.num_timesteps}, history={self.history_per_term}"
            )
        self.uniform_prob = float(state["uniform_prob"])
        self._loss_history = torch.as_tensor(state["loss_history"], dtype=torch.float64).clone()
        self._loss_counts = torch.as_tensor(state["loss_counts"], dtype=torch.long).clone()


def create_named_schedule_sampler(name: str, diffusion, **kwargs) -> ScheduleSampler:
    """"uniform" or "loss-second-moment" (kwargs go to the sampler)."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion, **kwargs)
    raise ValueError(f"unknown schedule sampler {name!r}; valid: uniform, loss-second-moment")
