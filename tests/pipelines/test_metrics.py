"""Unit tests of pipelines.metrics against closed forms and independent oracles (scipy, hand-built sets)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pipelines import metrics as M


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    # The textbook formula with scipy's general matrix square root (Heusel et al. 2017): independent oracle.
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_1d_closed_form():
    # 1-D Gaussians: d^2 = (m1 - m2)^2 + (s1 - s2)^2 (standard deviations)
    d = M.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx((1 + 2) ** 2 + (2 - 3) ** 2, rel=1e-12)


def test_frechet_diagonal_closed_form():
    # Commuting (diagonal) covariances: d^2 = |mu1-mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_general_matches_scipy_and_properties():
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 8), _random_spd(rng, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    d = M.frechet_distance(mu1, s1, mu2, s2)
    assert d == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)
    assert d == pytest.approx(M.frechet_distance(mu2, s2, mu1, s1), rel=1e-10)  # symmetric
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_singular_covariance_is_finite_and_nonnegative():
    rng = np.random.default_rng(2)
    f1, f2 = rng.standard_normal((5, 16)), rng.standard_normal((5, 16)) + 1  # N < D: rank-deficient
    d = M.frechet_distance_features(f1, f2)
    assert math.isfinite(d) and d > 0


def test_frechet_from_samples_converges_to_closed_form():
    # Monte Carlo: statistics of 200k draws from two known Gaussians reproduce the closed form.
    rng = np.random.default_rng(3)
    s1, s2 = _random_spd(rng, 3), _random_spd(rng, 3)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, 0.0])
    x1 = rng.multivariate_normal(mu1, s1, size=200_000)
    x2 = rng.multivariate_normal(mu2, s2, size=200_000)
    assert M.frechet_distance_features(torch.from_numpy(x1), x2) == pytest.approx(
        _scipy_frechet(mu1, s1, mu2, s2), rel=0.03)


def test_feature_statistics_unbiased():
    x = np.array([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    mu, sigma = M.feature_statistics(x)
    assert np.allclose(mu, [3.0, 2.0])
    assert np.allclose(sigma, np.cov(x.T, ddof=1))
    with pytest.raises(ValueError, match="N >= 2"):
        M.feature_statistics(x[:1])


def test_inception_score_known_distributions():
    k = 10
    # Confident and evenly spread over K classes: IS = K.
    assert M.inception_score(np.eye(k)) == pytest.approx(k, rel=1e-9)
    # Every image gets the same distribution: KL = 0, IS = 1.
    assert M.inception_score(np.full((7, k), 1 / k)) == pytest.approx(1.0, rel=1e-9)
    assert M.inception_score(np.tile(np.eye(k)[3], (5, 1))) == pytest.approx(1.0, rel=1e-6)
    # Two classes, half the images p=(q, 1-q), half (1-q, q): p(y) = (1/2, 1/2) and
    # IS = exp(log 2 - H(q)) = 2 exp(q log q + (1-q) log(1-q)).
    q = 0.8
    p = np.array([[q, 1 - q], [1 - q, q]] * 3)
    expected = 2 * math.exp(q * math.log(q) + (1 - q) * math.log(1 - q))
    assert M.inception_score(torch.from_numpy(p)) == pytest.approx(expected, rel=1e-9)
    # Confident but concentrated on 2 of 10 classes: IS = 2.
    assert M.inception_score(np.eye(k)[[0, 1, 0, 1]]) == pytest.approx(2.0, rel=1e-9)


def test_accuracy():
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    assert M.accuracy(logits, labels) == pytest.approx(0.5)
    assert M.accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])) == 1.0
    with pytest.raises(ValueError):
        M.accuracy(logits, labels[:3])


def _toy_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two easily separable 4x4 classes: a bright left half or a bright right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.full((n, 1, 4, 4), -1.0)
    x[y == 0, :, :, :2] = 1.0
    x[y == 1, :, :, 2:] = 1.0
    return (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1), y


def test_reference_classifier_learns_and_caches(tmp_path):
    x, y = _toy_images(256, 0)
    kw = dict(num_classes=2, steps=40, image_size=4, channels=1)
    net, info = M.load_or_train_classifier(tmp_path, "fp", x, y, **kw)
    assert not info["cached"]
    xt, yt = _toy_images(128, 1)
    feats, probs = net.embed(xt)
    assert feats.shape == (128, 64) and probs.shape == (128, 2)
    assert M.accuracy(probs, yt) > 0.95
    assert [p.name for p in tmp_path.iterdir()] == [f"reference_classifier-{info['key']}.safetensors"]
    net2, info2 = M.load_or_train_classifier(tmp_path, "fp", None, None, **kw)  # from disk: no images needed
    assert info2["cached"]
    assert torch.allclose(net2.embed(xt)[0], feats)
    # Another fingerprint is another classifier.
    assert M.classifier_cache_key("other", steps=40, image_size=4, channels=1, num_classes=2) != info["key"]


@pytest.mark.parametrize("size,channels", [(4, 1), (16, 3), (28, 1)])
def test_reference_classifier_shapes(size, channels):
    net = M.ReferenceClassifier(size, channels, 10)
    assert net(torch.zeros(2, channels, size, size)).shape == (2, 10)
