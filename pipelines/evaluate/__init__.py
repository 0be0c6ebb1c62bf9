"""Evaluation stage and the registry promotion gate, one module per concern.

``evaluate(cfg, model_uri, data)`` (:mod:`.stage`) measures a registered model on Ray tasks and logs everything
to MLflow:

- the embedded metric: a small reference classifier trained on the train split (cached on disk by data
  fingerprint) gives penultimate-layer features for the Frechet distance between generated and held-out real
  images, the accuracy of class-conditional samples against their requested labels and an Inception-Score-style
  figure; the real-vs-real baseline (a train subset of the same size vs the test split) makes them readable;
- NLL in bits/dim on a held-out subset (``GaussianDiffusion.calc_bpd_loop``);
- FID with InceptionV3 pool3 features, only when ``evaluate.inception_weights`` is set and torch-fidelity (the
  optional ``fid`` extra) imports, or with an injected feature extractor; otherwise skipped with a message;
- one sample grid per sampler (EMA weights; raw weights too when given) and the sampler table (quality and
  seconds per image per sampler), as an MLflow table plus ``report.json`` / ``report.md`` artifacts.

Held-out images are the test split when it holds at least two images, else the train split (one rule,
:func:`.tasks.load_held_out`, for the reference statistics and bits/dim).

Modules: :mod:`.tasks` (the bodies of the Ray tasks: reference classifier, one sampler row, bits/dim, FID),
:mod:`.runner` (named jobs as Ray tasks, ``evaluate.concurrency`` in flight), :mod:`.report` (grids, table,
``report.json`` / ``report.md``), :mod:`.gate` (version tags and :func:`promote`), :mod:`.stage` (the stage).

``promote(cfg, model_name, version, metrics)`` is the gate: the version gets ``registry.champion_alias`` if there
is no champion or its primary metric beats the champion's by ``evaluate.promote_margin`` (relative); otherwise it
is tagged ``rejected`` with the reason. A non-finite metric is never promoted, and a champion that changes while
the gate decides makes it refuse (:class:`PromotionConflict`).
"""

from pipelines.config import HIGHER_IS_BETTER, LOWER_IS_BETTER
from pipelines.evaluate.gate import (
    REJECTED_TAG,
    TAG_PREFIX,
    PromoteResult,
    PromotionConflict,
    metric_direction,
    promote,
    tag_version,
)
from pipelines.evaluate.report import SamplerRow
from pipelines.evaluate.stage import METRIC_PREFIX, EvalResult, evaluate
from pipelines.evaluate.tasks import (
    GRID_IMAGES,
    MIN_HELD_OUT,
    FeatureExtractorFactory,
    TorchFidelityInception,
    bpd_task,
    fid_task,
    load_held_out,
    reference_task,
    sampler_task,
)

__all__ = [
    "GRID_IMAGES",
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "METRIC_PREFIX",
    "MIN_HELD_OUT",
    "REJECTED_TAG",
    "TAG_PREFIX",
    "EvalResult",
    "FeatureExtractorFactory",
    "PromoteResult",
    "PromotionConflict",
    "SamplerRow",
    "TorchFidelityInception",
    "bpd_task",
    "evaluate",
    "fid_task",
    "load_held_out",
    "metric_direction",
    "promote",
    "reference_task",
    "sampler_task",
    "tag_version",
]
