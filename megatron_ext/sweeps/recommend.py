"""Which variant to pick, and which ones were unstable.

* Selection (``--select``): the best finished variant by one metric; variants that diverged never
  win, variants with spikes may win but are flagged. Ties keep the sweep's order (for stability and
  convergence, the lower final validation loss first). The four views of the LR and expert search
  guide are rules: performance (``val_loss``), stability (``stability``: the smallest largest rise of
  the train loss above its running minimum), convergence speed (``convergence``: fewest iterations
  to a target validation loss) and efficiency (``efficiency``: highest tokens/s); the
  recommendation names the best by each (``by_rule``) whatever rule selects.
* Diverged: a non-finite train or validation loss, or a final train loss above the first one.
* Spike: a logged train loss more than ``spike_threshold`` (default 0.25, i.e. 25 %) above the
  lowest train loss logged before it. Consecutive points above that line are one spike.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

DEFAULT_SPIKE_THRESHOLD = 0.25
# --select name -> (result field, which way is better, what the field is)
RULES = {
    "val_loss": ("final_val_loss", "lowest", "final validation loss"),
    "best_val_loss": ("best_val_loss", "lowest", "validation loss at its best evaluation"),
    "train_loss": ("final_train_loss", "lowest", "final train loss"),
    "val_accuracy": ("final_val_accuracy", "highest", "final validation next-token accuracy"),
    "stability": ("max_loss_rise", "lowest",
                  "largest rise of the logged train loss above the lowest logged before it (0 = it never rose)"),
    "convergence": ("steps_to_target", "lowest", "iterations to reach the target validation loss"),
    "efficiency": ("tokens_per_second", "highest", "training throughput (median tokens/s)"),
}
TIE_BREAK_BY_LOSS = ("stability", "convergence")
NOT_TUNED = ("seed",)  # replicas, not a setting to optimise: no "edge of the grid" note


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def instability(train: Sequence[Tuple[int, float]], valid: Sequence[Tuple[int, float]],
                spike_threshold: float = DEFAULT_SPIKE_THRESHOLD) -> dict:
    """Divergence and spikes of one variant from its (iteration, loss) points, NaN/inf kept."""
    divergence: Optional[str] = None
    for split, points in (("train", train), ("validation", valid)):
        bad = next(((it, v) for it, v in points if not _finite(v)), None)
        if bad is not None and (divergence is None or bad[0] < divergence[0]):
            divergence = (bad[0], f"non-finite {split} loss ({bad[1]}) at iteration {bad[0]}")
    divergence = divergence[1] if divergence else None
    finite = [(it, v) for it, v in train if _finite(v)]
    if divergence is None and len(finite) >= 2 and finite[-1][1] > finite[0][1]:
        divergence = (f"final train loss {finite[-1][1]:.4g} (iteration {finite[-1][0]}) is above the "
                      f"first {finite[0][1]:.4g} (iteration {finite[0][0]})")
    spikes: List[dict] = []
    running_min, current = math.inf, None
    for it, v in finite:
        if running_min < math.inf and v > running_min * (1.0 + spike_threshold):
            if current is None:
                current = {"iteration": it, "peak_iteration": it, "peak_loss": v, "running_min": running_min}
                spikes.append(current)
            elif v > current["peak_loss"]:
                current.update(peak_iteration=it, peak_loss=v)
        else:
            current = None
        running_min = min(running_min, v)
    for s in spikes:
        s["ratio"] = s["peak_loss"] / s["running_min"]
    return {"diverged": divergence is not None, "divergence": divergence, "spikes": spikes,
            "spike_threshold": spike_threshold, "max_loss_rise": max_loss_rise(finite)}


def max_loss_rise(points: Sequence[Tuple[int, float]]) -> Optional[float]:
    """The largest relative rise of a loss above the lowest value before it: max(loss / running
    minimum) - 1 over the points (0 when it never rose; None with fewer than two points)."""
    if len(points) < 2:
        return None
    running_min, rise = points[0][1], 0.0
    for _, v in points[1:]:
        if running_min > 0:
            rise = max(rise, v / running_min - 1.0)
        running_min = min(running_min, v)
    return rise


def convergence_target(results: List[dict], target: Optional[float] = None) -> Optional[float]:
    """The validation loss to count iterations to: ``target``, or the highest final validation loss
    among the finished variants that did not diverge (every one of them reaches it)."""
    if target is not None:
        return target
    finals = [r["final_val_loss"] for r in results if r.get("status") == "finished"
              and not (r.get("instability") or {}).get("diverged") and _finite(r.get("final_val_loss"))]
    return max(finals) if finals else None


def steps_to(curve: Sequence, target: Optional[float]) -> Optional[int]:
    """The first evaluation's iteration whose validation loss is at or below ``target`` (None: never)."""
    if target is None:
        return None
    return next((it for it, v in curve if _finite(v) and v <= target), None)


def _as_number(text) -> Optional[float]:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def edge_notes(best: dict, results: List[dict], keys: Sequence[str], derived: Sequence[str] = ()) -> List[str]:
    """A best value at the end of the values tried (the others held at the best's) may not be the
    optimum: say so. ``derived`` keys (set by variant rules) follow the others and are not compared."""
    notes = []

    def others_of(values, key):
        return {k: v for k, v in values.items() if k != key and k not in derived}

    for key in keys:
        if key in NOT_TUNED or key in derived:
            continue
        mine = _as_number(best["values"].get(key))
        if mine is None:
            continue
        others = others_of(best["values"], key)
        tried = sorted({n for r in results
                        if key in r["values"] and others_of(r["values"], key) == others
                        for n in [_as_number(r["values"][key])] if n is not None})
        if len(tried) < 2:
            continue
        if mine == tried[-1]:
            notes.append(f"{key}={best['values'][key]} is the largest {key} tried: the optimum may lie above it")
        elif mine == tried[0]:
            notes.append(f"{key}={best['values'][key]} is the smallest {key} tried: the optimum may lie below it")
    return notes


def _ranked(results: List[dict], select: str) -> List[dict]:
    """The finished variants that did not diverge and have the rule's number, best first."""
    field, better, _ = RULES[select]
    eligible = [r for r in results if r.get("status") == "finished"
                and not (r.get("instability") or {}).get("diverged") and _finite(r.get(field))]
    sign = -1.0 if better == "highest" else 1.0

    def order(r):
        loss = r.get("final_val_loss") if select in TIE_BREAK_BY_LOSS and _finite(r.get("final_val_loss")) else 0.0
        return (sign * r[field], loss)

    return sorted(eligible, key=order)


def recommend(results: List[dict], select: str = "val_loss", keys: Sequence[str] = (),
              derived: Sequence[str] = (), target_loss: Optional[float] = None) -> dict:
    """The recommendation (``recommendation.json``) for the variants' results (with
    ``steps_to_target`` filled in, which the convergence rule ranks)."""
    target = convergence_target(results, target_loss)
    for r in results:
        r["steps_to_target"] = steps_to((r.get("curves") or {}).get("val_loss", []), target)
        r["max_loss_rise"] = (r.get("instability") or {}).get("max_loss_rise")
    field, better, text = RULES[select]
    ranked = _ranked(results, select)
    rec: Dict[str, object] = {
        "select": select,
        "metric": field,
        "rule": f"{better} {text} ({field}) among the finished variants that did not diverge; variants with "
                f"spikes stay eligible but are flagged",
        "best": None,
        "runner_up": None,
        "ranking": [{"name": r["name"], field: r[field]} for r in ranked],
        "unstable": [],
        "failed": [],
        "notes": [],
        "target_loss": target,
        "target_rule": ("given (--target-loss)" if target_loss is not None else
                        "the highest final validation loss among the finished variants that did not diverge"),
        "by_rule": {},
    }
    for rule, (rule_field, _, rule_text) in RULES.items():
        best_here = (_ranked(results, rule) or [None])[0]
        rec["by_rule"][rule] = None if best_here is None else {
            "name": best_here["name"], "values": best_here["values"], rule_field: best_here[rule_field],
            "rule": rule_text}
    for r in results:
        inst = r.get("instability") or {}
        if inst.get("diverged") or inst.get("spikes"):
            rec["unstable"].append({"name": r["name"], "diverged": bool(inst.get("diverged")),
                                    "divergence": inst.get("divergence"), "spikes": inst.get("spikes") or []})
        if r.get("status") != "finished":
            rec["failed"].append({"name": r["name"], "status": r.get("status"), "error": r.get("error")})
    if not ranked:
        rec["notes"].append(f"no finished variant that did not diverge has a {field}: nothing to recommend")
        return rec
    best = ranked[0]
    rec["best"] = {"name": best["name"], "values": best["values"], field: best[field],
                   "command": best.get("command"), "env": best.get("env") or {}}
    if len(ranked) > 1:
        second = ranked[1]
        rec["runner_up"] = {"name": second["name"], "values": second["values"], field: second[field],
                            "difference": abs(second[field] - best[field])}
    rec["notes"] += edge_notes(best, results, keys, derived)
    if (best.get("instability") or {}).get("spikes"):
        rec["notes"].append(f"the best variant {best['name']} had loss spikes; see 'unstable'")
    return rec
