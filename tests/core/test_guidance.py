import pytest
import torch

from diffusion_core import ClassifierFreeGuidance, GaussianDiffusion, classifier_cond_fn, dynamic_threshold
from diffusion_core import get_named_beta_schedule as schedule


class LabelModel:
    """Output channel values depend on (x, t, y) so guidance can be checked by hand; learned-sigma style 2C."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, t, y=None):
        self.batch_sizes.append(x.shape[0])
        yy = torch.zeros(x.shape[0]) if y is None else y.float()
        scale = (1 + yy + t.float() / 1000).reshape(-1, 1, 1, 1)
        return torch.cat([x * scale, x + yy.reshape(-1, 1, 1, 1)], dim=1)


def test_cfg_formula_and_variance_channels():
    m = LabelModel()
    cfg = ClassifierFreeGuidance(m, guidance_scale=4.0, null_label=10, eps_channels=2)
    x = torch.randn(3, 2, 2, 2)
    t = torch.tensor([5, 500, 999])
    y = torch.tensor([1, 2, 3])
    out = cfg(x, t, y=y)
    cond, uncond = m(x, t, y=y), m(x, t, y=torch.full_like(y, 10))
    torch.testing.assert_close(out[:, :2], uncond[:, :2] + 4.0 * (cond[:, :2] - uncond[:, :2]))
    torch.testing.assert_close(out[:, 2:], cond[:, 2:])
    assert m.batch_sizes[0] == 6  # one batched pass


def test_cfg_scale_one_per_row_scales_and_no_labels():
    m = LabelModel()
    x = torch.randn(2, 2, 2, 2)
    t = torch.tensor([1, 2])
    y = torch.tensor([0, 4])
    torch.testing.assert_close(ClassifierFreeGuidance(m, 1.0, 10, 2)(x, t, y=y), m(x, t, y=y))
    m.batch_sizes.clear()
    ClassifierFreeGuidance(m, 1.0, 10, 2)(x, t, y=y)
    assert m.batch_sizes == [2]  # s = 1 skips the unconditional pass
    scales = torch.tensor([1.0, 3.0])
    out = ClassifierFreeGuidance(m, scales, 10, 2)(x, t, y=y)
    for i, s in enumerate((1.0, 3.0)):
        row = ClassifierFreeGuidance(m, s, 10, 2)(x[i:i + 1], t[i:i + 1], y=y[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], row)
    torch.testing.assert_close(ClassifierFreeGuidance(m, 3.0, 10, 2)(x, t), m(x, t))


def test_cfg_in_sampling_uses_labels_from_model_kwargs():
    d = GaussianDiffusion(betas=schedule("linear", 100), model_mean_type="epsilon", model_var_type="learned_range",
                          loss_type="mse")
    m = LabelModel()
    cfg = ClassifierFreeGuidance(m, 2.0, null_label=10)
    x = torch.randn(2, 2, 2, 2)
    out = d.p_mean_variance(cfg, x, torch.tensor([50, 50]), model_kwargs={"y": torch.tensor([1, 2])})
    assert out["mean"].shape == x.shape and m.batch_sizes == [4]


def test_dynamic_threshold():
    x = torch.rand(2, 3, 8, 8) * 1.8 - 0.9
    assert torch.equal(dynamic_threshold(x), x)  # |x| < 1: s = 1, nothing changes
    y = x.clone()
    y[1] *= 4
    out = dynamic_threshold(y, percentile=0.9)
    assert torch.equal(out[0], x[0]) and out.abs().max() <= 1
    s = torch.quantile(y[1].abs().flatten(), 0.9)
    torch.testing.assert_close(out[1], y[1].clamp(-s, s) / s)


def test_classifier_cond_fn_gradient():
    W = torch.randn(4, 8)

    def classifier(x, t):
        return x.flatten(1) @ W.T

    x = torch.randn(3, 2, 2, 2)
    y = torch.tensor([0, 3, 1])
    g = classifier_cond_fn(classifier, scale=2.0)(x, torch.zeros(3, dtype=torch.long), y=y)
    p = torch.softmax(classifier(x, None), -1)
    expected = 2.0 * (W[y] - p @ W).reshape(x.shape)  # d/dx log softmax_y(Wx) = W_y - sum_k p_k W_k
    torch.testing.assert_close(g, expected)


def test_class_labels_broadcast_cycle_and_refuse():
    from diffusion_core.guidance import class_labels

    assert class_labels(3, 0) is None
    assert class_labels(5, 3).tolist() == [0, 1, 2, 0, 1]  # none given: the classes cycled
    assert class_labels(3, 10, [7]).tolist() == [7, 7, 7]  # one label, broadcast
    assert class_labels(2, 10, [4, 9]).tolist() == [4, 9]
    for given, msg in (([1, 2], "1 or num_samples=3"), ([10], r"\[0, 9\], got \[10\]"), ([-1], "got \\[-1\\]")):
        with pytest.raises(ValueError, match=msg):
            class_labels(3, 10, given)
    with pytest.raises(ValueError, match="unconditional"):
        class_labels(2, 0, [1])


def test_conditioned_model_wraps_only_for_guidance():
    from diffusion_core.guidance import conditioned_model

    m, y = LabelModel(), torch.tensor([1, 2])
    assert conditioned_model(m, None, 1.0, null_label=10) == (m, {})
    assert conditioned_model(m, y, 1.0, null_label=10)[0] is m
    wrapped, kwargs = conditioned_model(m, y, 3.0, null_label=10, eps_channels=2)
    assert isinstance(wrapped, ClassifierFreeGuidance) and wrapped.guidance_scale == 3.0 and kwargs["y"] is y
    assert wrapped.null_label == 10 and wrapped.eps_channels == 2
    with pytest.raises(ValueError, match="guidance_scale=2 needs a class-conditional model"):
        conditioned_model(m, None, 2.0, null_label=0)
