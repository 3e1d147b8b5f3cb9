"""``megatron-ext coord-check [options] [training flags]``: the coordinate check of muP/CompleteP.

Trains a few steps at several widths (all parametrizations) and depths (sp and completep), prints
the typical activation size (mean |x|) of the embedding, each layer and the logits per size, and
the slope of log(size) against log(width or depth). mup/completep pass when every slope stays
below --threshold; sp is shown for contrast (its activations grow with width at a fixed LR).
Exit code 0 when every parametrization other than sp passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List

from megatron_ext.argtypes import positive_int

PASS_THROUGH = True
DEFAULT_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--seq-length", "64", "--lr", "3e-3",
                 "--weight-decay", "0", "--mock-data"]


def add_parser(sub):
    sub.add_parser("coord-check", add_help=False,
                   help="coordinate check: activation size vs width/depth under sp, mup, completep (pass/fail)")


def _sizes(text: str) -> List[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(sizes) < 2 or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"need at least two positive sizes, got {text!r}")
    return sizes


def _own_parser() -> argparse.ArgumentParser:
    from megatron_ext.parametrizations.common.coord_check import DEFAULT_DEPTHS, DEFAULT_WIDTHS

    p = argparse.ArgumentParser(prog="megatron-ext coord-check", add_help=False, allow_abbrev=False,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--parametrizations", default="sp,mup,completep", help="comma-separated (default all three)")
    p.add_argument("--widths", type=_sizes, default=list(DEFAULT_WIDTHS), help="hidden sizes (smallest = base)")
    p.add_argument("--depths", type=_sizes, default=list(DEFAULT_DEPTHS), help="layer counts for sp and completep")
    p.add_argument("--no-depth", action="store_true", help="width sweep only")
    p.add_argument("--steps", type=positive_int, default=5, help="training steps per size (default 5)")
    p.add_argument("--batch", type=positive_int, default=4, help="sequences in the fixed batch (default 4)")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads at every width (default 4)")
    p.add_argument("--threshold", type=float, default=0.25, help="largest |slope| that passes (default 0.25)")
    p.add_argument("--json", metavar="FILE", help="write every measurement and verdict as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot activation size vs size per step (needs matplotlib)")
    return p


def run_argv(argv) -> int:
    import warnings

    from megatron_ext.commands import parse_own_options

    own = _own_parser()
    opts, rest = parse_own_options(own, argv)
    from megatron_ext.parametrizations import PARAMETRIZATIONS

    names = [n.strip() for n in opts.parametrizations.split(",") if n.strip()]
    for n in names:
        if n not in PARAMETRIZATIONS.names():
            own.error(f"--parametrizations: unknown '{n}' (known: {', '.join(PARAMETRIZATIONS.names())})")
    if any(n not in ("sp", "mup", "completep") for n in names):
        own.error("--parametrizations: the check knows the base shapes of sp, mup and completep only")
    if opts.widths[-1] % opts.heads or opts.widths[0] % opts.heads:
        own.error(f"--heads {opts.heads} must divide every width")
    plt = None
    if opts.plot:
        from megatron_ext.plotting import MISSING, pyplot

        plt = pyplot() or own.error(f"--plot {MISSING}")
    base = DEFAULT_FLAGS + ["--train-iters", str(opts.steps)] + rest  # user flags come last and win
    from megatron_ext.arguments import ArgumentsError
    from megatron_ext.plan import parse_args

    try:  # bad training flags: one line before any work
        parse_args(base, world_size=1)
    except (ArgumentsError, SystemExit) as e:
        return e.code if isinstance(e, SystemExit) else 2

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps

    from megatron_ext.parametrizations.common.coord_check import coord_check
    from megatron_ext.platform import init_distributed

    init_distributed()
    ps.initialize_model_parallel()
    runs = []
    for name in names:
        runs.append((name, coord_check(base, "width", opts.widths, parametrization=name, steps=opts.steps,
                                       batch=opts.batch, heads=opts.heads, threshold=opts.threshold)))
        if not opts.no_depth and name in ("sp", "completep"):
            runs.append((name, coord_check(base, "depth", opts.depths, parametrization=name, steps=opts.steps,
                                           batch=opts.batch, heads=opts.heads, threshold=opts.threshold)))
    ok = True
    for name, r in runs:
        print(f"{name} across {r.axis} {','.join(map(str, r.sizes))} (mean |activation| after step {opts.steps}):")
        for act, per_size in r.activations.items():
            values = " ".join(f"{v[-1]:9.4g}" for v in per_size)
            print(f"  {act:<12} {values}   slope {r.slopes[act]:+.2f}")
        if name == "sp":
            verdict = "grows with size as expected" if not r.passed else "flat (LR too small to show the blow-up?)"
        else:
            verdict = "PASS" if r.passed else f"FAIL ({r.worst} slope {r.slopes[r.worst]:+.2f})"
            ok &= r.passed
        print(f"  -> {verdict} (|slope| < {opts.threshold:g} passes)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump([dict(parametrization=n, **r.as_dict()) for n, r in runs], f, indent=1)
    if plt is not None:
        _plot(plt, runs, opts.plot)
    sys.stdout.flush()
    return 0 if ok else 1


def _plot(plt, runs, path) -> None:
    acts = sorted({a for _, r in runs for a in r.activations}, key=lambda a: (a != "embedding", a == "logits", a))
    fig, axes = plt.subplots(len(runs), len(acts), figsize=(3 * len(acts), 2.6 * len(runs)), squeeze=False)
    for row, (name, r) in enumerate(runs):
        for col, act in enumerate(acts):
            ax = axes[row][col]
            per_size = r.activations.get(act)
            if per_size:
                for step in range(len(per_size[0])):
                    ax.plot(r.sizes, [v[step] for v in per_size], marker="o", label=f"step {step + 1}")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
            ax.set_title(f"{name} {act} vs {r.axis}", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
