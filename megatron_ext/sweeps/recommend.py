"""Which variant to pick, and which ones were unstable.

* Selection (``--select``): the best finished variant by one metric; variants that diverged never
  win, variants with spikes may win but are flagged. Ties keep the sweep's order.
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
}
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
            "spike_threshold": spike_threshold}


def _as_number(text) -> Optional[float]:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def edge_notes(best: dict, results: List[dict], keys: Sequence[str]) -> List[str]:
    """A best value at the end of the values tried (the others held at the best's) may not be the
    optimum: say so."""
    notes = []
    for key in keys:
        if key in NOT_TUNED:
            continue
        mine = _as_number(best["values"].get(key))
        if mine is None:
            continue
        others = {k: v for k, v in best["values"].items() if k != key}
        tried = sorted({n for r in results
                        if key in r["values"] and {k: v for k, v in r["values"].items() if k != key} == others
                        for n in [_as_number(r["values"][key])] if n is not None})
        if len(tried) < 2:
            continue
        if mine == tried[-1]:
            notes.append(f"{key}={best['values'][key]} is the largest {key} tried: the optimum may lie above it")
        elif mine == tried[0]:
            notes.append(f"{key}={best['values'][key]} is the smallest {key} tried: the optimum may lie below it")
    return notes


def recommend(results: List[dict], select: str = "val_loss", keys: Sequence[str] = ()) -> dict:
    """The recommendation (``recommendation.json``) for the variants' results."""
    field, better, text = RULES[select]
    eligible = [r for r in results if r.get("status") == "finished"
                and not (r.get("instability") or {}).get("diverged") and _finite(r.get(field))]
    ranked = sorted(eligible, key=lambda r: r[field], reverse=better == "highest")
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
    }
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
    rec["notes"] += edge_notes(best, results, keys)
    if (best.get("instability") or {}).get("spikes"):
        rec["notes"].append(f"the best variant {best['name']} had loss spikes; see 'unstable'")
    return rec
