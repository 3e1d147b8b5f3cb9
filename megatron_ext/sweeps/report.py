"""Gather a sweep directory's variants into the combined outputs: ``results.json``,
``results.csv``, the plots and ``recommendation.json`` (also what ``--collect DIR`` runs)."""
from __future__ import annotations

import os
import time
from typing import List, Optional, Tuple

from megatron_ext.sweeps import plots
from megatron_ext.sweeps.recommend import DEFAULT_SPIKE_THRESHOLD, recommend
from megatron_ext.sweeps.results import _write_json, read_records, summarize, sweep_keys, write_combined
from megatron_ext.sweeps.runner import METRICS, RESULT, SPEC, read_json

SWEEP = "sweep.json"
# bookkeeping of a run that does not belong in the comparison
_PRIVATE = ("pid",)


def variant_dirs(out_dir: str) -> List[str]:
    """The sweep's variant directories, in the sweep's order (all variant directories when the
    sweep file is missing)."""
    sweep = read_json(os.path.join(out_dir, SWEEP))
    if sweep and sweep.get("variants"):
        return [os.path.join(out_dir, n) for n in sweep["variants"]]
    names = sorted(n for n in os.listdir(out_dir) if os.path.isfile(os.path.join(out_dir, n, SPEC)))
    return [os.path.join(out_dir, n) for n in names]


def collect_variant(vdir: str, spike_threshold: float) -> Optional[dict]:
    """One variant's result, its numbers recomputed from its metrics (so a running job's partial
    curves and another spike threshold show up)."""
    spec = read_json(os.path.join(vdir, SPEC))
    if spec is None:
        return None
    result = read_json(os.path.join(vdir, RESULT))
    if not result or result.get("key") != spec["key"]:
        result = {"status": "pending", "run_count": 0}
    result = {k: v for k, v in result.items() if k not in _PRIVATE}
    result.update(name=spec["name"], key=spec["key"], values=spec["values"], command=spec["command"], env=spec["env"])
    result.update(summarize(read_records(os.path.join(vdir, METRICS)), spike_threshold))
    return result


def report(out_dir: str, select: str = "val_loss", spike_threshold: float = DEFAULT_SPIKE_THRESHOLD,
           target_loss: Optional[float] = None) -> Tuple[List[dict], dict, List[str]]:
    """(results, recommendation, files written) for the sweep in ``out_dir`` (``target_loss``, for
    the convergence rule: default the sweep's own, else the highest final validation loss)."""
    results = [r for r in (collect_variant(d, spike_threshold) for d in variant_dirs(out_dir)) if r is not None]
    keys = sweep_keys(results)
    sweep = read_json(os.path.join(out_dir, SWEEP)) or {}
    if target_loss is None:
        target_loss = sweep.get("target_loss")
    derived = (sweep.get("settings") or {}).get("rule_keys", [])
    rec = recommend(results, select, keys, derived, target_loss)
    rec["spike_threshold"] = spike_threshold
    rec["divergence_rule"] = "a non-finite train or validation loss, or a final train loss above the first"
    rec["spike_rule"] = (f"a logged train loss more than {100 * spike_threshold:g}% above the lowest train loss "
                         f"logged before it (loss > (1 + {spike_threshold:g}) x running minimum)")
    written = write_combined(out_dir, results, {"collected": time.time(), "select": select,
                                                "spike_threshold": spike_threshold})
    path = os.path.join(out_dir, "recommendation.json")
    _write_json(path, rec)
    written.append(path)
    written += plots.write_plots(out_dir, results, keys, select, (rec.get("best") or {}).get("name"))
    return results, rec, written
