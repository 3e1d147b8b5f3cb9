"""``megatron-ext lr-finder PATH [--skip-start A] [--skip-end B] [--beta B] [--plot FILE] [--json]``: re-read
the result of an LR range test (``--lr-finder``) and print its suggested learning rates.

PATH is the test's directory (``<save>/lr_finder``, or the ``--save`` directory holding it) or an
``lr_finder.csv``. The suggestions are recomputed from the CSV's smoothed loss, so other trimming
can be tried without another run: ``--skip-start``/``--skip-end`` default to the test's own
settings (from ``lr_finder.json``; for a bare CSV, rows // 10 and 5); ``--beta`` re-smooths the
raw loss column with another EMA factor. See docs/lr_finder.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_ext.argtypes import finite_float, nonneg_int

PROG = "megatron-ext lr-finder"


def add_parser(sub):
    p = sub.add_parser("lr-finder", help="print (and plot) the suggested LRs of an LR range test (--lr-finder)",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH", help="the test's lr_finder directory, its --save directory, or lr_finder.csv")
    p.add_argument("--skip-start", type=nonneg_int, default=None,
                   help="points dropped at the start (default: the test's setting)")
    p.add_argument("--skip-end", type=nonneg_int, default=None,
                   help="points dropped at the end (default: the test's setting)")
    p.add_argument("--beta", type=finite_float, default=None,
                   help="re-smooth the loss with this EMA factor in [0, 1) (default: the CSV's smoothed_loss)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot the curve and the suggestions (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the suggestions as JSON")
    p.set_defaults(func=run)


class LRFinderPathError(ValueError):
    """One-line error of this command."""


def find_files(path: str):
    """(csv path, json path or None) for a finder directory, a --save directory or a CSV."""
    from megatron_ext.training.lr_finder import CSV_NAME, DIR_NAME, JSON_NAME

    if os.path.isdir(path):
        for d in (path, os.path.join(path, DIR_NAME)):
            if os.path.isfile(os.path.join(d, CSV_NAME)):
                path = os.path.join(d, CSV_NAME)
                break
        else:
            raise LRFinderPathError(f"{path}: no {CSV_NAME} here or in {os.path.join(path, DIR_NAME)}")
    elif not os.path.isfile(path):
        raise LRFinderPathError(f"{path}: no such file or directory")
    meta = os.path.join(os.path.dirname(os.path.abspath(path)), JSON_NAME)
    return path, meta if os.path.isfile(meta) else None


def run(args) -> int:
    from megatron_ext.training import lr_finder

    try:
        if args.beta is not None and not 0.0 <= args.beta < 1.0:
            raise LRFinderPathError(f"--beta must be in [0, 1), got {args.beta:g}")
        if args.plot:
            from megatron_ext.plotting import MISSING, pyplot

            if pyplot() is None:
                raise LRFinderPathError(f"--plot {MISSING}")
        csv_path, json_path = find_files(args.path)
        lrs, losses, smoothed = lr_finder.read_curve(csv_path)
        settings, stop = {}, None
        if json_path:
            try:
                with open(json_path) as f:
                    saved = json.load(f)
                settings, stop = saved.get("settings", {}), saved.get("stop_reason")
            except (OSError, ValueError) as e:
                raise LRFinderPathError(f"{json_path}: unreadable ({e})") from None
    except (LRFinderPathError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    skip_start = args.skip_start
    if skip_start is None:
        skip_start = settings.get("skip_start", lr_finder.default_skip_start(len(lrs)))
    skip_end = args.skip_end
    if skip_end is None:
        skip_end = settings.get("skip_end", lr_finder.DEFAULTS["lr_finder_skip_end"])
    if args.beta is not None:
        smoothed = lr_finder.resmooth(losses, args.beta)
    s = lr_finder.suggest(lrs, smoothed, skip_start, skip_end)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(f"# {csv_path}: {len(lrs)} points" + (f", lr {lrs[0]:.3g} .. {lrs[-1]:.3g}" if lrs else ""))
        if stop:
            print(f"# stop: {stop}")
        print(f"# trimmed: first {skip_start}, last {skip_end} points ({s['points_used']} used)"
              + (f"; loss re-smoothed with beta {args.beta:g}" if args.beta is not None else ""))
        for line in lr_finder.format_suggestions(s):
            print(line)
    if args.plot:
        lr_finder.plot(args.plot, lrs, losses, smoothed, s, f"LR range test: {csv_path}")
        print(f"# wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0
