"""``megatron-ext coord-check [options] [training flags]``: the coordinate check of muP/CompleteP.

Trains a few steps at several widths (all parametrizations) and depths (sp and completep), prints
the typical activation size (mean |x|) of the embedding, each layer and the logits per size, and
the slope of log(size) against log(width or depth). mup/completep pass when every slope stays
below --threshold; sp is shown for contrast (its activations grow with width at a fixed LR).
Exit code 0 when every parametrization other than sp passes, 1 otherwise.

The check (Tensor Programs V, section 9.2) runs the real megatron-core model with the trainer's
parametrization, param groups, optimizer and LR scheduler, in one process without DeepSpeed (an
engine per width would only add start-up time). Pass/fail: for every recorded activation, the slope
of log(size) against log(width) (or depth) after the last step must stay below ``threshold`` in
absolute value.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Dict, List, Sequence

from megatron_ext.argtypes import positive_int

DEFAULT_WIDTHS = (64, 128, 256, 512)
DEFAULT_DEPTHS = (2, 4, 8, 16)


@dataclasses.dataclass
class CoordCheckResult:
    axis: str  # "width" or "depth"
    sizes: List[int]
    # activation name -> per size -> per step: mean |x|
    activations: Dict[str, List[List[float]]]
    slopes: Dict[str, float]  # at the last step
    threshold: float

    @property
    def worst(self) -> str:
        return max(self.slopes, key=lambda k: abs(self.slopes[k]))

    @property
    def passed(self) -> bool:
        return all(abs(s) < self.threshold for s in self.slopes.values())

    def as_dict(self) -> dict:
        return dict(axis=self.axis, sizes=self.sizes, activations=self.activations, slopes=self.slopes,
                    threshold=self.threshold, passed=self.passed, worst=self.worst)


def log_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-30)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _record(model, store: Dict[str, float]):
    """Forward hooks writing mean |x| of the embedding output, every layer's output and the logits."""

    def hook(name):
        def fn(module, inputs, output):
            x = output[0] if isinstance(output, tuple) else output
            store[name] = float(x.detach().float().abs().mean())

        return fn

    layers = model.decoder.layers
    handles = [model.embedding.register_forward_hook(hook("embedding"))]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(f"layer{i + 1}" if i + 1 < len(layers) else "last_layer")))
    handles.append(model.output_layer.register_forward_hook(hook("logits")))
    return handles


def _one_run(argv: List[str], steps: int, batch: int, seed: int) -> Dict[str, List[float]]:
    """Mean |activation| per recorded module, at each of ``steps`` training steps."""
    import torch

    from megatron_ext.models.gpt import build_model
    from megatron_ext.optimizers import build_optimizer
    from megatron_ext.parametrizations import parametrization_for
    from megatron_ext.plan import parse_args
    from megatron_ext.schedules.common.scheduler import ParamScheduler
    from megatron_ext.training.trainer import set_seeds

    args = parse_args(argv, world_size=1)
    set_seeds(seed)
    parametrization = parametrization_for(args)
    vocab = 512
    model = build_model(args, vocab, parametrization)
    optimizer = build_optimizer(model, args, parametrization)
    scheduler = ParamScheduler.from_args(optimizer, args)
    store: Dict[str, float] = {}
    handles = _record(model, store)
    # One fixed batch, the same at every size and step: the update then meets the inputs it was
    # computed from, the regime muP's analysis describes; fresh random batches at these small
    # widths mostly measure how many unrelated tokens a batch holds.
    data = torch.Generator().manual_seed(seed)
    series: Dict[str, List[float]] = {}
    positions = torch.arange(args.seq_length).unsqueeze(0).expand(batch, -1)
    for step in range(steps):
        scheduler.step(step * batch)
        if step == 0:
            tokens = torch.randint(0, vocab, (batch, args.seq_length + 1), generator=data)
        losses = model(input_ids=tokens[:, :-1], position_ids=positions, attention_mask=None, labels=tokens[:, 1:])
        for name, value in store.items():
            series.setdefault(name, []).append(value)
        optimizer.zero_grad(set_to_none=True)
        losses.float().mean().backward()
        optimizer.step()
    for h in handles:
        h.remove()
    return series


def coord_check(base_argv: List[str], axis: str, sizes: Sequence[int], *, parametrization: str, steps: int = 5,
                batch: int = 4, heads: int = 4, seed: int = 1234, threshold: float = 0.25) -> CoordCheckResult:
    """Run the check along ``axis`` ("width": --hidden-size; "depth": --num-layers). The smallest
    size is the base shape of mup/completep."""
    sizes = sorted(sizes)
    activations: Dict[str, List[List[float]]] = {}
    for size in sizes:
        argv = list(base_argv) + ["--parametrization", parametrization, "--lr-decay-style", "constant",
                                  "--lr-warmup-iters", "0", "--num-attention-heads", str(heads)]
        if axis == "width":
            argv += ["--hidden-size", str(size), "--ffn-hidden-size", str(4 * size)]
            if parametrization in ("mup", "completep"):
                argv += ["--mup-base-hidden", str(sizes[0])]
        else:
            argv += ["--num-layers", str(size)]
            if parametrization == "completep":
                argv += ["--depth-base", str(sizes[0])]
        for name, values in _one_run(argv, steps, batch, seed).items():
            activations.setdefault(name, []).append(values)
    if axis == "depth":  # the layers in between differ from depth to depth
        activations = {k: v for k, v in activations.items() if k in ("embedding", "last_layer", "logits")}
    slopes = {name: log_slope(sizes, [per_size[-1] for per_size in values])
              for name, values in activations.items() if values and len(values) == len(sizes)}
    return CoordCheckResult(axis, list(sizes), activations, slopes, threshold)


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
