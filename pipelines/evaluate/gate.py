"""The promotion gate and the registry tags it reads.

:func:`tag_version` records a version's evaluation (``eval.<metric>`` tags, the comparability setup, the run id).
:func:`promote` gives the version ``registry.champion_alias`` if there is no champion or its primary metric beats
the champion's by ``evaluate.promote_margin`` (relative); otherwise it is tagged ``rejected`` with the reason.

Order of writes, so that a crash or a rival never leaves a false record:

1. decide from the champion read at the start; a non-finite metric is never promoted (champion or not);
2. to promote: read the champion again just before moving the alias, and refuse (:class:`PromotionConflict`,
   nothing written) when it changed meanwhile: the decision was made against a champion that is gone;
3. move the alias (the commit point), then write the decision tags and the description line.

MLflow has no compare-and-set on aliases, so step 2 narrows the race to the two calls around it; it cannot close
it. Promoting the version that already holds the alias is a no-op (nothing is written).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import BaseModel

from pipelines.config import HIGHER_IS_BETTER, LOWER_IS_BETTER, ConfigError, PipelineConfig

log = logging.getLogger("pipelines.evaluate")

TAG_PREFIX = "eval."  # model-version tags: eval.frechet_distance, ...
REJECTED_TAG = "rejected"


class PromotionConflict(RuntimeError):
    """The champion changed while the gate was deciding; nothing was written. Run the gate again."""


class PromoteResult(BaseModel):
    model_name: str
    version: str
    decision: Literal["promoted", "rejected", "already_champion"]
    promoted: bool
    reason: str
    metric: str
    higher_is_better: bool
    value: float | None
    champion_version: str | None
    champion_value: float | None
    margin: float
    alias: str


def metric_direction(name: str) -> bool:
    """True when higher values of metric ``name`` are better; ConfigError for metrics the gate does not know."""
    if name in HIGHER_IS_BETTER:
        return True
    if name in LOWER_IS_BETTER:
        return False
    raise ConfigError(f"evaluate.primary_metric: unknown metric '{name}'; accepted: lower is better "
                      f"{', '.join(LOWER_IS_BETTER)}; higher is better {', '.join(HIGHER_IS_BETTER)}")


# ------------------------------------------------------------------------------------------------ version tags
def comparability(reference: dict[str, Any]) -> str:
    """What has to match for two versions' metrics to be comparable (recorded on each version)."""
    clf = (reference.get("classifier") or {}).get("key")
    gate = reference["gate_sampler"]
    return (f"classifier={clf};data={reference['data_fingerprint']};sampler={gate['sampler']}/{gate['steps']};"
            f"n={reference['num_samples']};seed={reference['seed']};guidance={reference['guidance_scale']}")


def tag_version(client, name: str, version: str, metrics: dict[str, float], reference: dict[str, Any],
                run_id: str) -> None:
    """Record an evaluation on the model version: ``eval.<metric>``, ``eval.setup`` and ``eval.run_id``."""
    for k, v in metrics.items():
        client.set_model_version_tag(name, version, TAG_PREFIX + k, repr(float(v)))
    client.set_model_version_tag(name, version, TAG_PREFIX + "setup", comparability(reference))
    client.set_model_version_tag(name, version, TAG_PREFIX + "run_id", run_id)


# ------------------------------------------------------------------------------------------------ the gate
def _champion(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise


def _as_float(s: str | None) -> float | None:
    try:
        return float(s) if s is not None else None
    except ValueError:
        return None


def _decide(metric: str, higher: bool, margin: float, value: float, version: str, champ_version: str | None,
            champ_value: float | None, alias: str, model_name: str) -> tuple[str, str]:
    """(decision, reason). Lower-is-better metrics need ``new < champ - margin * |champ|``, higher-is-better
    ones ``new > champ + margin * |champ|`` (ties are rejected)."""
    better = "higher" if higher else "lower"
    if champ_version == version:
        return "already_champion", f"version {version} already holds '{alias}'"
    if not math.isfinite(value):
        return "rejected", f"{metric} is not finite ({value}): a non-finite metric is never promoted"
    if champ_version is None:
        return "promoted", f"no current '{alias}': the first evaluated version is promoted ({metric} {value:.6g})"
    if champ_value is None or not math.isfinite(champ_value):
        return "rejected", (f"champion v{champ_version} has no recorded {metric}: evaluate it (diffusion-pipeline "
                            f"evaluate --model-uri models:/{model_name}@{alias}) and run the gate again")
    bound = champ_value + margin * abs(champ_value) if higher else champ_value - margin * abs(champ_value)
    wins = value > bound if higher else value < bound
    reason = (f"{metric} {value:.6g} {'beats' if wins else 'does not beat'} champion v{champ_version}'s "
              f"{champ_value:.6g} by the required margin {margin:.1%} ({better} is better; needed "
              f"{'>' if higher else '<'} {bound:.6g})")
    return ("promoted" if wins else "rejected"), reason


def _setup_note(mv, champ) -> str:
    mine, theirs = (mv.tags or {}).get(TAG_PREFIX + "setup"), (champ.tags or {}).get(TAG_PREFIX + "setup")
    if mine and theirs and mine != theirs:
        return f" (note: evaluated under different setups: this version '{mine}', champion '{theirs}')"
    return ""


def promote(cfg: PipelineConfig, model_name: str, version: str | int, metrics: dict[str, float]) -> PromoteResult:
    """Give ``version`` the champion alias if there is no champion or its ``evaluate.primary_metric`` beats the
    champion's by the relative ``evaluate.promote_margin``; otherwise tag it ``rejected`` with the reason.

    The champion's number is its ``eval.<metric>`` tag, written by ``evaluate`` (evaluate the champion again if it
    lacks one). Raises :class:`PromotionConflict` when the champion changes while deciding (see the module
    docstring for the order of writes).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import setup_mlflow

    ev, alias = cfg.evaluate, cfg.registry.champion_alias
    metric, margin = ev.primary_metric, ev.promote_margin
    higher = metric_direction(metric)
    version = str(version)
    setup_mlflow(cfg)
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version(model_name, version)
    except MlflowException as e:
        raise ValueError(f"model version {model_name}/{version} not found in the registry at "
                         f"{cfg.tracking_uri}: {e.message}") from None
    if metric not in metrics:
        raise ValueError(f"evaluate.primary_metric is '{metric}' but the metrics have no such entry "
                         f"(have: {', '.join(sorted(metrics)) or 'none'})")
    value = float(metrics[metric])

    # 1. Decide against the champion as read now.
    champ = _champion(client, model_name, alias)
    champ_version = str(champ.version) if champ else None
    champ_value = _as_float((champ.tags or {}).get(TAG_PREFIX + metric)) if champ else None
    decision, reason = _decide(metric, higher, margin, value, version, champ_version, champ_value, alias, model_name)
    if champ is not None and decision != "already_champion":
        reason += _setup_note(mv, champ)
    result = PromoteResult(model_name=model_name, version=version, decision=decision,
                           promoted=decision in ("promoted", "already_champion"), reason=reason, metric=metric,
                           higher_is_better=higher, value=value, champion_version=champ_version,
                           champion_value=champ_value, margin=margin, alias=alias)
    if decision == "already_champion":
        return result

    # 2. Promote only if the champion is still the one decided against; 3. then move the alias.
    if decision == "promoted":
        now = _champion(client, model_name, alias)
        now_version = str(now.version) if now else None
        if now_version != champ_version:
            raise PromotionConflict(
                f"the '{alias}' of {model_name} changed from {_v(champ_version)} to {_v(now_version)} while gating "
                f"v{version}; nothing was written: run the gate again to compare against the new champion")
        client.set_registered_model_alias(model_name, alias, version)
    _record(client, result, mv)
    return result


def _v(version: str | None) -> str:
    return "none" if version is None else f"v{version}"


def _record(client, r: PromoteResult, mv) -> None:
    """The decision's tags and one description line on the version (after the alias moved, if it did)."""
    name, version = r.model_name, r.version
    tags = {"promotion.decision": r.decision, "promotion.reason": r.reason, "promotion.metric": r.metric,
            "promotion.value": repr(r.value), "promotion.champion_version": r.champion_version or "",
            "promotion.champion_value": "" if r.champion_value is None else repr(r.champion_value),
            "promotion.margin": repr(r.margin), "promotion.higher_is_better": str(r.higher_is_better).lower(),
            TAG_PREFIX + r.metric: repr(r.value)}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if r.decision == "promoted":
        if REJECTED_TAG in (mv.tags or {}):
            client.delete_model_version_tag(name, version, REJECTED_TAG)
        if r.champion_version is not None:
            client.set_model_version_tag(name, r.champion_version, "superseded_by", version)
    else:
        client.set_model_version_tag(name, version, REJECTED_TAG, r.reason)
    better = "higher" if r.higher_is_better else "lower"
    champ_txt = "none" if r.champion_version is None else \
        f"v{r.champion_version} = {r.champion_value if r.champion_value is not None else 'n/a'}"
    line = (f"[promotion gate] {r.decision}: {r.metric} = {r.value:.6g} ({better} is better), champion {champ_txt}, "
            f"margin {r.margin:.1%}. {r.reason}")
    desc = (mv.description or "").rstrip()
    client.update_model_version(name, version, description=f"{desc}\n{line}".strip())
    log.info("promotion gate for %s v%s: %s", name, version, line)
