"""One variant's numbers from the trainer's ``metrics.jsonl``, and the sweep's combined results
(``results.json``, ``results.csv``, the printed table)."""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence

from megatron_ext.fileio import write_text_atomically
from megatron_ext.sweeps.recommend import DEFAULT_SPIKE_THRESHOLD, RULES, instability

CORPUS_SPLIT = "validation_per_corpus"  # the trainer's --eval-per-corpus records (training/evaluation.py)

CSV_METRICS = ("iterations", "final_train_loss", "final_val_loss", "best_val_loss", "best_val_iteration",
               "final_val_ppl", "final_val_accuracy", "tokens_per_second", "max_loss_rise", "steps_to_target",
               "wall_s")


def finite(x) -> Optional[float]:
    """A JSON-safe number: None for NaN/inf/missing (the instability flags keep the reason)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def read_records(path: str) -> List[dict]:
    """The trainer's records, by iteration; a resumed run logs some iterations again: the later wins."""
    records: Dict[tuple, dict] = {}
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:  # a line cut short when the run was stopped
                continue
            if isinstance(r, dict) and "split" in r and "iteration" in r:
                records[(r["split"], r["iteration"])] = r
    return sorted(records.values(), key=lambda r: r["iteration"])


def _json_safe(record: dict) -> dict:
    return {k: (finite(v) if isinstance(v, float) else v) for k, v in record.items() if k != "split"}


def summarize(records: List[dict], spike_threshold: float = DEFAULT_SPIKE_THRESHOLD) -> dict:
    """Final/best losses, accuracy, perplexity, tokens/s, curves and instability flags."""
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "validation"]
    train_points = [(r["iteration"], r.get("lm_loss", math.nan)) for r in train]
    valid_points = [(r["iteration"], r.get("lm_loss", math.nan)) for r in valid]
    out = {
        "iterations": train[-1]["iteration"] if train else 0,
        "first_train_loss": finite(train[0].get("lm_loss")) if train else None,
        "final_train_loss": finite(train[-1].get("lm_loss")) if train else None,
        "final_val_loss": None, "best_val_loss": None, "best_val_iteration": None, "final_val_ppl": None,
        "final_val_accuracy": None, "best_val_accuracy": None, "tokens_per_second": None,
    }
    if valid:
        last = valid[-1]
        out["final_val_loss"] = finite(last.get("lm_loss"))
        loss = out["final_val_loss"]
        out["final_val_ppl"] = finite(last.get("ppl", math.exp(min(loss, 20.0)) if loss is not None else None))
        good = [(r["iteration"], r["lm_loss"]) for r in valid if finite(r.get("lm_loss")) is not None]
        if good:
            out["best_val_iteration"], out["best_val_loss"] = min(good, key=lambda p: p[1])
        accs = [finite(r.get("accuracy")) for r in valid if "accuracy" in r]
        if "accuracy" in last:
            out["final_val_accuracy"] = finite(last["accuracy"])
        if any(a is not None for a in accs):
            out["best_val_accuracy"] = max(a for a in accs if a is not None)
    # the first logged window includes start-up (compilation, first allocations): left out when there are others
    speeds = [finite(r.get("tokens_per_second")) for r in (train[1:] if len(train) > 1 else train)]
    speeds = [s for s in speeds if s is not None]
    if speeds:
        out["tokens_per_second"] = statistics.median(speeds)
    out["final_train_record"] = _json_safe(train[-1]) if train else None
    out["final_val_record"] = _json_safe(valid[-1]) if valid else None
    per_corpus = [r for r in records if r["split"] == CORPUS_SPLIT]
    # --eval-per-corpus: each corpus's last validation loss (data-mixture sweeps compare these)
    out["final_val_loss_per_corpus"] = ({k: finite(v) for k, v in per_corpus[-1].get("lm_loss", {}).items()}
                                        if per_corpus else None)
    out["curves"] = {
        "train_loss": [[it, finite(v)] for it, v in train_points],
        "val_loss": [[it, finite(v)] for it, v in valid_points],
        "val_accuracy": [[r["iteration"], finite(r.get("accuracy"))] for r in valid if "accuracy" in r],
    }
    out["instability"] = instability(train_points, valid_points, spike_threshold)
    return out


def sweep_keys(results: Sequence[dict]) -> List[str]:
    """The keys the variants set, in first-seen order."""
    keys: List[str] = []
    for r in results:
        keys += [k for k in r["values"] if k not in keys]
    return keys


def write_combined(out_dir: str, results: List[dict], extra: dict) -> List[str]:
    """``results.json`` (everything, curves included) and ``results.csv`` (one row per variant)."""
    keys = sweep_keys(results)
    path_json = os.path.join(out_dir, "results.json")
    _write_json(path_json, {**extra, "keys": keys, "variants": results})
    path_csv = os.path.join(out_dir, "results.csv")
    with open(path_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "status", *keys, *CSV_METRICS, "diverged", "spikes", "error"])
        for r in results:
            inst = r.get("instability") or {}
            w.writerow([r["name"], r.get("status"), *(r["values"].get(k, "") for k in keys),
                        *("" if r.get(m) is None else r[m] for m in CSV_METRICS),
                        int(bool(inst.get("diverged"))), len(inst.get("spikes") or []),
                        (r.get("error") or [""])[-1] if r.get("status") != "finished" else ""])
    return [path_json, path_csv]


def _write_json(path: str, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: List[dict], rec: dict) -> str:
    """The sweep at a glance, then the recommendation."""
    rows = [("variant", "status", "train loss", "val loss", "best val", "val acc", "val ppl", "tokens/s", "flags")]
    for r in results:
        inst = r.get("instability") or {}
        flags = []
        if inst.get("diverged"):
            flags.append("diverged")
        if inst.get("spikes"):
            flags.append(f"spikes:{len(inst['spikes'])}")
        if r.get("status") not in ("finished",) and r.get("error"):
            flags.append(r["error"][-1][:60])
        best = rec.get("best") and rec["best"]["name"] == r["name"]
        rows.append(((("* " if best else "  ") + r["name"]), r.get("status") or "-",
                     _fmt(r.get("final_train_loss")), _fmt(r.get("final_val_loss")), _fmt(r.get("best_val_loss")),
                     _fmt(r.get("final_val_accuracy")), _fmt(r.get("final_val_ppl"), ".2f"),
                     _fmt(r.get("tokens_per_second"), ".0f"), " ".join(flags) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if rec.get("best"):
        field = rec["metric"]
        lines.append(f"recommendation: {rec['best']['name']} ({field} {rec['best'][field]:.4f}); rule: {rec['rule']}")
    views = []
    for rule, best in (rec.get("by_rule") or {}).items():
        if best is not None and rule in ("val_loss", "stability", "convergence", "efficiency"):
            field = RULES[rule][0]
            value = best[field]
            shown = f"{value:.0f}" if rule in ("convergence", "efficiency") else f"{value:.4f}"
            views.append(f"{rule}: {best['name']} ({field} {shown})")
    if views:
        target = rec.get("target_loss")
        lines.append("best by rule: " + "; ".join(views)
                     + (f" (convergence = iterations to validation loss {target:.4f})" if target is not None else ""))
    lines += [f"note: {n}" for n in rec.get("notes", [])]
    return "\n".join(lines)
