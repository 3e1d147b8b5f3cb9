"""Comparison plots of a sweep (when matplotlib is importable): every variant's validation (and
train) loss against the iteration, and the selection metric against each swept value."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

from megatron_ext.plotting import pyplot
from megatron_ext.sweeps.recommend import RULES, _as_number


def _label(r: dict) -> str:
    return r["name"] + ("" if r.get("status") == "finished" else f" ({r.get('status')})")


def plot_curves(plt, path: str, results: List[dict], curve: str, ylabel: str, best: Optional[str]) -> bool:
    drawn = False
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        points = [(it, v) for it, v in (r.get("curves") or {}).get(curve, [])]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] if p[1] is not None else float("nan") for p in points]
        style = "-" if r.get("status") == "finished" else ":"
        ax.plot(xs, ys, style, marker="o" if len(xs) < 30 else None, markersize=3,
                linewidth=2.5 if r["name"] == best else 1.2, label=_label(r) + (" (best)" if r["name"] == best else ""))
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per variant")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_metric_vs_key(plt, path: str, results: List[dict], key: str, keys: Sequence[str], select: str,
                       best: Optional[str]) -> bool:
    """The selection metric against ``key``'s values: one line per setting of the other keys."""
    field, _, text = RULES[select]
    have = [r for r in results if key in r["values"]]
    values = list(dict.fromkeys(r["values"][key] for r in have))
    if len(values) < 2:
        return False
    numbers = [_as_number(v) for v in values]
    numeric = all(n is not None for n in numbers)
    position = {v: (n if numeric else i) for i, (v, n) in enumerate(zip(values, numbers))}
    others = [k for k in keys if k != key]
    groups = {}
    for r in have:
        groups.setdefault(tuple(r["values"].get(k) for k in others), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for ident, rs in groups.items():
        pts = sorted((position[r["values"][key]], r[field]) for r in rs
                     if r.get(field) is not None and not (r.get("instability") or {}).get("diverged"))
        if not pts:
            continue
        label = ",".join(f"{k}={v}" for k, v in zip(others, ident) if v is not None) or None
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=label)
        drawn = True
    for r in have:
        if r["name"] == best and r.get(field) is not None:
            ax.plot([position[r["values"][key]]], [r[field]], "*", markersize=16, color="gold",
                    markeredgecolor="black", label="best", zorder=5)
    if not drawn:
        plt.close(fig)
        return False
    if numeric and min(numbers) > 0 and max(numbers) / min(numbers) >= 3:  # LR-style grids are geometric
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(values)
    ax.set_xlabel(key)
    ax.set_ylabel(field)
    n_out = sum(1 for r in have if r.get(field) is None or (r.get("instability") or {}).get("diverged"))
    ax.set_title(f"{text} vs {key}" + (f" ({n_out} failed/diverged not shown)" if n_out else ""), fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_plots(out_dir: str, results: List[dict], keys: Sequence[str], select: str,
                best: Optional[str]) -> List[str]:
    """The PNGs written (none without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    for curve, name, ylabel in (("val_loss", "val_loss.png", "validation loss"),
                                ("train_loss", "train_loss.png", "train loss")):
        path = os.path.join(out_dir, name)
        if plot_curves(plt, path, results, curve, ylabel, best):
            written.append(path)
    for key in keys:
        path = os.path.join(out_dir, f"{RULES[select][0]}_vs_{key}.png")
        if plot_metric_vs_key(plt, path, results, key, keys, select, best):
            written.append(path)
    return written
