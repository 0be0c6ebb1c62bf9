"""Sample-quality metrics used by ``pipelines.evaluate`` (numpy/torch only, no torchvision).

- :func:`frechet_distance` between two Gaussians fitted to feature sets (the formula behind FID),
- :func:`inception_score` (an Inception-Score-style figure from any classifier's class probabilities),
- :func:`accuracy` of predicted classes against requested labels,
- :class:`ReferenceClassifier`, the small CNN whose penultimate layer is the embedded feature space, and
  :func:`train_reference_classifier` / :func:`load_or_train_classifier` (cached on disk, atomic write).

These are evaluation metrics, not diffusion math, so they live here rather than in ``diffusion_core``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIER_VERSION = 1  # bump when the architecture or training recipe changes (invalidates the cache)


# ------------------------------------------------------------------------------------------------ statistics
def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of a feature set [N, D]; needs N >= 2."""
    f = np.asarray(features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features,
                   dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) (Dowson & Landau 1982; Heusel et al. 2017, FID).
    tr((S1 S2)^1/2) is computed as tr((S1^1/2 S2 S1^1/2)^1/2): the same eigenvalues, but of a symmetric PSD
    matrix, so no complex parts or sqrtm failures on singular (few-sample) covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _sqrtm_psd(s1)
    middle = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def frechet_distance_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """:func:`frechet_distance` between Gaussians fitted to two feature sets [N, D], [M, D]."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def inception_score(probs: torch.Tensor | np.ndarray, eps: float = 1e-12) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with p(y) the mean of p(y|x) over the set (Salimans et al. 2016, Sec. 4).

    ``probs`` [N, K] rows are class distributions. Ranges from 1 (every image gets the same distribution) to K
    (confident predictions spread evenly over the K classes). Single split, no Inception network: a
    confidence/diversity figure in the reference classifier's label space.
    """
    p = np.asarray(probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else probs, np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"probs must be [N, K], got shape {p.shape}")
    py = p.mean(axis=0, keepdims=True)
    kl = (p * (np.log(p + eps) - np.log(py + eps))).sum(axis=1)
    return float(math.exp(kl.mean()))


def accuracy(logits_or_pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose predicted class (argmax of [N, K] logits, or [N] class ids) equals ``labels``."""
    pred = logits_or_pred.argmax(dim=1) if logits_or_pred.ndim == 2 else logits_or_pred
    labels = labels.to(pred.device).long().reshape(-1)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} predictions but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set")
    return float((pred.long() == labels).float().mean())


# ------------------------------------------------------------------------------------------ the classifier
class ReferenceClassifier(nn.Module):
    """A small CNN (any square size >= 4, 1 or 3 channels): conv stages halving the resolution down to 4x4,
    global average pooling, a ``feature_dim`` penultimate layer (the embedded feature space), then logits."""

    def __init__(self, image_size: int, channels: int, num_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"the reference classifier needs >= 2 classes, got {num_classes}")
        self.config = dict(image_size=image_size, channels=channels, num_classes=num_classes, width=width,
                           feature_dim=feature_dim)
        layers: list[nn.Module] = []
        c_in, c, res = channels, width, image_size
        while True:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
            if res <= 4:
                break
            layers.append(nn.AvgPool2d(2))
            res //= 2
            c = min(c * 2, 4 * width)
        self.body = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Linear(c_in, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [B, feature_dim] of images in [-1, 1]."""
        return self.feature(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, D], class probabilities [N, K]) on CPU, computed in eval mode in batches."""
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        feats, probs = [], []
        for i in range(0, x.shape[0], batch_size):
            f = self.features(x[i : i + batch_size].to(dev).float())
            feats.append(f.cpu())
            probs.append(F.softmax(self.head(f), dim=1).cpu())
        self.train(was)
        d, k = self.config["feature_dim"], self.config["num_classes"]
        if not feats:
            return torch.zeros(0, d), torch.zeros(0, k)
        return torch.cat(feats), torch.cat(probs)


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1 pixel (replicate padding): cheap augmentation for small images."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


def train_reference_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int,
                               batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                               device: str | torch.device = "cpu") -> ReferenceClassifier:
    """Train :class:`ReferenceClassifier` with Adam + cross-entropy on (images in [-1, 1], labels)."""
    if images.shape[0] == 0:
        raise ValueError("no training images for the reference classifier")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    _, c, h, _ = images.shape
    net = ReferenceClassifier(h, c, num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    net.train()
    n = images.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        x = _shift(images[idx], g).to(device)
        loss = F.cross_entropy(net(x), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def classifier_cache_key(fingerprint: str, *, steps: int, image_size: int, channels: int, num_classes: int,
                         seed: int = 0) -> str:
    """Cache key of a reference classifier: data fingerprint + everything that changes its weights."""
    payload = dict(v=CLASSIFIER_VERSION, fingerprint=fingerprint, steps=steps, image_size=image_size,
                   channels=channels, num_classes=num_classes, seed=seed)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``pipelines.storage.write_bytes``: unique temp name + ``os.replace``)."""
    from pipelines.storage import write_bytes

    write_bytes(path, data)


def load_or_train_classifier(cache_dir: Path, fingerprint: str, images: torch.Tensor | None,
                             labels: torch.Tensor | None, *, num_classes: int, steps: int, image_size: int,
                             channels: int, seed: int = 0,
                             device: str | torch.device = "cpu") -> tuple[ReferenceClassifier, dict[str, Any]]:
    """The cached classifier for this data fingerprint, or a freshly trained one (then cached atomically).

    ``images``/``labels`` (the train split) are only read on a cache miss. Returns (net, info) where info has
    ``key``, ``path`` and ``cached`` (whether it came from disk).
    """
    from safetensors.torch import load, save

    key = classifier_cache_key(fingerprint, steps=steps, image_size=image_size, channels=channels,
                               num_classes=num_classes, seed=seed)
    path = Path(cache_dir) / f"reference_classifier-{key}.safetensors"
    if path.is_file():
        try:
            state = load(path.read_bytes())
            net = ReferenceClassifier(image_size, channels, num_classes)
            net.load_state_dict(state)
            return net.to(device).eval(), {"key": key, "path": str(path), "cached": True}
        except Exception:  # a corrupt or foreign file: retrain and overwrite
            pass
    if images is None or labels is None:
        raise ValueError("reference classifier not cached and no training images given")
    net = train_reference_classifier(images, labels, num_classes, steps=steps, seed=seed, device=device)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"fingerprint": fingerprint, "key": key}))
    return net, {"key": key, "path": str(path), "cached": False}
