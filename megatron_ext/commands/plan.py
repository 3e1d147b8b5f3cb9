"""``megatron-ext plan [training flags] [--model PRESET] [--device NAME] [--world-size N | --devices N]
[--json] [--plot FILE.png]``: fit before you queue.

One layout (``--world-size N``, default 1): the memory per device of the most loaded rank, term by
term with its formula, the step time at an assumed utilisation of the device's peak, tokens per
second and per day, and the whole run in node-hours. ``--devices N``: search the layouts of N
devices that fit (tensor x pipeline x expert x sequence x data parallel, ZeRO stage, micro batch,
recomputation; the ones a flag fixes are kept), ranked by estimated throughput, each as the
``train_alcf.sh`` variables to use. ``--launcher``: the launch is the ``train_alcf.sh`` variables in
the environment (and the arguments are its extra arguments). docs/memory_plan.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Dict, List, Tuple

from megatron_ext.argtypes import positive_int
from megatron_ext.commands import parse_own_options

PASS_THROUGH = True  # everything after the command name is parsed here (own options + training flags)
PROG = "megatron-ext plan"
DATA_FLAGS = ("--mock-data", "--data-path", "--data-file-list")
LENGTH_FLAGS = ("--train-iters", "--train-samples", "--train-tokens")
DEFAULT_SEARCH_GLOBAL_BATCH = 1024  # sequences, when --devices searches without --global-batch-size
# flags of the layout: stripped from the model's plan, applied to the estimate (and fixed in a search)
LAYOUT_DESTS = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
                "expert_model_parallel_size": "ep", "ds_sequence_parallel_size": "sp"}
SEARCH_FIXED = {"zero_stage": "zero", "micro_batch_size": "micro_batch", "recompute_activations": "recompute"}


HELP = "memory per device and time of a run, or a search of the layouts that fit (fit before you queue)"


def add_parser(sub):
    sub.add_parser("plan", help=HELP, add_help=False)


def _own_parser() -> argparse.ArgumentParser:
    description = ("The memory per device and the time of a run with these training flags, or (--devices N) the "
                   "layouts that fit N devices. Every training flag is accepted; these are extra "
                   "(docs/memory_plan.md):")
    p = argparse.ArgumentParser(prog=PROG, description=description, allow_abbrev=False, add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="show this help")
    p.add_argument("--model", metavar="PRESET", help="a train_alcf.sh MODEL_ARCH preset (7B, 70B, openseek-small...); "
                                                     "model flags given too win")
    p.add_argument("--device", metavar="NAME", help="the accelerator to plan for (a100, h100, h200, mi250x, mi300x, "
                                                    "aurora-tile...; default: this machine's)")
    p.add_argument("--world-size", type=positive_int, default=None, help="ranks of the run planned (default 1)")
    p.add_argument("--devices", type=positive_int, default=None,
                   help="search the layouts of this many devices that fit, ranked by estimated throughput")
    p.add_argument("--devices-per-node", type=positive_int, default=None,
                   help="devices per node (default: the device's usual node: 8 H100s, 4 Polaris A100s, 12 Aurora tiles)")
    p.add_argument("--top", type=positive_int, default=10, help="layouts a search prints (default 10)")
    p.add_argument("--launcher", action="store_true",
                   help="plan the train_alcf.sh launch the environment's variables describe (the arguments are its "
                        "extra arguments)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (machine-readable)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the memory per device by term as stacked bars")
    return p


def given_dests(parser, argv: List[str]) -> Dict[str, str]:
    """dest -> the option spelled in ``argv`` for every training flag given."""
    from megatron_ext.arguments import normalise_argv

    actions = parser._option_string_actions
    out = {}
    for tok in normalise_argv(argv):
        name = tok.split("=", 1)[0]
        if name in actions:
            out[actions[name].dest] = name
    return out


def _strip(argv: List[str], parser, dests) -> Tuple[List[str], Dict[str, int]]:
    """``argv`` without the flags of ``dests`` (and their values), and those values."""
    from megatron_ext.arguments import normalise_argv

    actions = parser._option_string_actions
    out, values, argv = [], {}, normalise_argv(argv)
    i = 0
    while i < len(argv):
        tok = argv[i]
        name, eq, inline = tok.partition("=")
        action = actions.get(name)
        if action is not None and action.dest in dests:
            raw = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            values[action.dest] = raw
            i += 1 if eq else 2
            continue
        out.append(tok)
        i += 1
    return out, values


class PlanInputError(ValueError):
    pass


def _model_argv(opts) -> List[str]:
    if not opts.model:
        return []
    from megatron_ext.launcher.presets import MODEL_PRESETS, preset_name

    name = preset_name(opts.model)
    if name is None:
        import difflib

        close = difflib.get_close_matches(opts.model, list(MODEL_PRESETS), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PlanInputError(f"--model {opts.model!r} is not a preset{hint}; known: {', '.join(MODEL_PRESETS)}")
    p = MODEL_PRESETS[name]
    return ["--num-layers", str(p["num_layers"]), "--hidden-size", str(p["hidden_size"]), "--ffn-hidden-size",
            str(p["ffn_hidden_size"]), "--num-attention-heads", str(p["num_attention_heads"]),
            "--num-key-value-heads", str(p["num_key_value_heads"]), "--seq-length", str(p["seq_length"]),
            "--max-position-embeddings", str(p["seq_length"]), "--rope-theta", str(p["rope_theta"]),
            *p.get("flags", ())]


def build(opts, rest: List[str]):
    """(base run plan, layout sizes, fixed search dimensions, notes, device) for the options."""
    from megatron_ext.arguments import ArgumentsError, build_parser
    from megatron_ext.plan import build_plan, parse_or_problem
    from megatron_ext.planning import devices

    try:
        device = devices.lookup(opts.device) if opts.device else devices.detect()
    except devices.UnknownDevice as e:
        raise PlanInputError(f"--device: {e}") from None
    if opts.devices_per_node:
        import dataclasses

        device = dataclasses.replace(device, per_node=opts.devices_per_node)
    parser = build_parser(prog=PROG)
    notes: List[str] = []
    argv = _model_argv(opts) + list(rest)
    given = given_dests(parser, argv)
    if not any(d in given for d in ("mock_data", "data_path", "data_file_list")):
        argv.append("--mock-data")
    if not any(d in given for d in ("train_iters", "train_samples", "train_tokens")):
        from megatron_ext.launcher.resolve import DEFAULT_TRAIN_TOKENS

        argv += ["--train-tokens", str(DEFAULT_TRAIN_TOKENS)]
        notes.append(f"run length: train_alcf.sh's default TRAIN_TOKENS {DEFAULT_TRAIN_TOKENS:.3g} (give --train-tokens "
                     "or --train-iters)")
    if "vocab_size" not in given and "tokenizer_model" not in given:
        from megatron_ext.planning.memory import ASSUMED_VOCAB

        argv += ["--vocab-size", str(ASSUMED_VOCAB)]
        notes.append(f"vocabulary {ASSUMED_VOCAB} assumed (give --vocab-size or --tokenizer-model)")
    if opts.device and device.kind != "cpu" and not ({"bf16", "fp16"} & set(given)):
        argv.append("--bf16")
        notes.append("bf16 (train_alcf.sh's DTYPE on accelerators; --fp16 or a DeepSpeed config to change)")
    if opts.devices and "global_batch_size" not in given:
        argv += ["--global-batch-size", str(DEFAULT_SEARCH_GLOBAL_BATCH)]
        notes.append(f"global batch {DEFAULT_SEARCH_GLOBAL_BATCH} sequences (give --global-batch-size)")
    # a search lays the model out itself; one layout keeps TP in the plan (its checks) and adds the rest
    stripped_dests = set(LAYOUT_DESTS) if opts.devices else set(LAYOUT_DESTS) - {"tensor_model_parallel_size"}
    argv, raw = _strip(argv, parser, stripped_dests)
    sizes = {LAYOUT_DESTS[d]: _size(v, parser, d) for d, v in raw.items()}
    fixed = dict(sizes) if opts.devices else {}
    if opts.devices:
        for dest, key in SEARCH_FIXED.items():
            if dest in given:
                fixed[key] = None  # read from the plan below
    world = opts.devices or opts.world_size or 1
    model_ranks = sizes.get("pp", 1) * sizes.get("sp", 1)
    if opts.devices:
        plan_world = 1
    else:
        if world % model_ranks:
            raise PlanInputError(f"--pipeline-model-parallel-size x --ds-sequence-parallel-size = {model_ranks} does "
                                 f"not divide --world-size {world}")
        plan_world = world // model_ranks
    args, problem = parse_or_problem(parser, argv)
    if problem is not None:
        raise PlanInputError(problem)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            plan = build_plan(args, plan_world, check_files="tokenizer_model" in given)
    except ArgumentsError as e:
        raise PlanInputError(str(e)) from None
    for dest, key in SEARCH_FIXED.items():
        if key in fixed:
            fixed[key] = plan.engine.zero_stage if key == "zero" else getattr(plan.args, dest)
    return plan, sizes, fixed, notes, device, world


def _size(raw: str, parser, dest: str) -> int:
    try:
        return positive_int(raw)
    except argparse.ArgumentTypeError as e:
        flag = next(o for o, a in parser._option_string_actions.items() if a.dest == dest and o.startswith("--"))
        raise PlanInputError(f"argument {flag}: {e}") from None


def _launcher_plan(opts, rest):
    """The launch ``train_alcf.sh`` would make from the environment's variables."""
    from megatron_ext.launcher.resolve import LaunchError, resolve
    from megatron_ext.planning import devices

    try:
        device = devices.lookup(opts.device) if opts.device else devices.detect()
    except devices.UnknownDevice as e:
        raise PlanInputError(f"--device: {e}") from None
    repo = os.environ.get("MEGATRON_EXT_ROOT") or os.getcwd()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            launch = resolve(os.environ, list(rest), repo,
                             accelerator=(device.kind, opts.devices_per_node or device.per_node), check_files=False)
    except LaunchError as e:
        raise PlanInputError(f"train_alcf.sh: {e}") from None
    return launch.plan, device


def run_argv(argv) -> int:
    own = _own_parser()
    opts, rest = parse_own_options(own, argv)
    if opts.devices and opts.world_size:
        own.error("give --world-size N (one layout) or --devices N (a search), not both")
    if opts.launcher and (opts.devices or opts.world_size or opts.model):
        own.error("--launcher plans the variables' launch (NHOSTS x NGPU_PER_HOST, MODEL_ARCH): drop --devices, "
                  "--world-size and --model")
    plt = None
    if opts.plot:
        from megatron_ext.plotting import MISSING, pyplot

        plt = pyplot() or own.error(f"--plot {MISSING}")
    try:
        if opts.launcher:
            plan, device = _launcher_plan(opts, rest)
            return _single(opts, plan, device, {}, [], plt)
        plan, sizes, fixed, notes, device, world = build(opts, rest)
    except PlanInputError as e:
        own.error(str(e))
    if opts.devices:
        return _search(opts, plan, device, fixed, notes, plt)
    return _single(opts, plan, device, sizes, notes, plt)


def _memory_of(opts, plan, device) -> float:
    a = plan.args
    return a.device_memory * 1024 ** 3 if a.device_memory else device.memory


def _single(opts, plan, device, sizes, notes, plt) -> int:
    from megatron_ext.planning import report
    from megatron_ext.planning.layout import Layout, runnable
    from megatron_ext.planning.memory import estimate, setup_from_plan, vocabulary
    from megatron_ext.planning.throughput import step_time

    a = plan.args
    layout = Layout(tp=a.tensor_model_parallel_size, pp=sizes.get("pp", a.pipeline_model_parallel_size),
                    ep=sizes.get("ep", a.expert_model_parallel_size), sp=sizes.get("sp", a.ds_sequence_parallel_size),
                    dp=plan.data_parallel_size)
    from megatron_ext.planning.search import model_problem

    why = model_problem(a, layout)
    if why:
        raise SystemExit(_fail(f"the layout {layout.spell()} does not divide the model's {why}"))
    setup = setup_from_plan(plan, device.kind, here=opts.device is None, layout=layout)
    memory = _memory_of(opts, plan, device)
    if opts.device is None and device.kind == "cpu" and not a.device_memory:
        memory = device.memory / report.local_ranks(layout.world)
    assessment = report.Assessment(setup, estimate(setup), step_time(setup, device, a.train_iters, a.mfu,
                                                                     a.peak_tflops), device, memory)
    runner, why_not = runnable(layout, setup.zero_stage, moe=bool(a.num_experts), precision=setup.precision,
                               cpu_offload=setup.cpu_offload)
    _, vocab_note = vocabulary(a, layout.tp)
    notes = notes + list(plan.notes) + ([vocab_note] if vocab_note and not any("vocabulary" in n for n in notes) else [])
    if runner is None:
        notes.append(f"not runnable today: {why_not} (planning/layout.py RUNNABLE)")
    if opts.json:
        record = report.as_json(assessment)
        record["notes"] = record["notes"] + notes
        record["runnable"] = runner is not None
        print(json.dumps(record, indent=2))
    else:
        print(_header(plan, device, layout, assessment))
        width = 28
        for label, value in report.rows(assessment):
            print(f"  {label:<{width}} {value}")
        print("  formulas:")
        for t in assessment.memory.terms:
            print(f"    {t.key:<12} {t.formula}")
        for name, b in assessment.memory.phases:
            print(f"  moment: {name:<18} {report._fmt(b)}")
        for n in notes + list(assessment.memory.notes):
            print(f"  note: {n}")
    if plt is not None:
        report.plot([assessment], [layout.spell()], opts.plot, plt)
        print(f"# wrote {opts.plot}", file=sys.stderr if opts.json else sys.stdout)
    return 0


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _header(plan, device, layout, assessment) -> str:
    a = plan.args
    lay = layout
    return (f"memory and time plan: {assessment.memory.parameters / 1e9:.3g}B parameters ({a.num_layers} layers, "
            f"hidden {a.hidden_size}), {lay.spell()} = {lay.world} rank(s) of {device.description or device.name}; "
            f"ZeRO {assessment.setup.zero_stage}, {assessment.setup.precision}, micro batch {a.micro_batch_size} x "
            f"{assessment.setup.accumulation} accumulation, sequence {a.seq_length}, --optimizer {a.optimizer}")


def _search(opts, plan, device, fixed, notes, plt) -> int:
    from megatron_ext.planning import report, search
    from megatron_ext.planning.layout import Layout
    from megatron_ext.planning.memory import setup_from_plan

    a = plan.args
    base = setup_from_plan(plan, device.kind, here=opts.device is None, layout=Layout(tp=1, dp=1))
    memory = _memory_of(opts, plan, device)
    found = search.search(base, device, opts.devices, memory, a.train_iters, fixed, a.mfu, a.peak_tflops)
    model = opts.model
    shown = found.fitting[:opts.top]
    if opts.json:
        print(json.dumps({
            "devices": opts.devices, "device": device.name, "device_memory_bytes": memory,
            "global_batch": a.global_batch_size, "considered": found.considered, "not_runnable": found.not_runnable,
            "too_big": found.too_big, "fitting": len(found.fitting), "notes": notes,
            "layouts": [{**report.as_json(x), "variables": search.launcher_variables(x, model, device.per_node)}
                        for x in shown]}, indent=2))
    else:
        print(f"layouts of {a.num_layers} layers x hidden {a.hidden_size} "
              f"({found.fitting[0].memory.parameters / 1e9 if found.fitting else 0:.3g}B parameters) on {opts.devices} "
              f"x {device.description or device.name}, global batch {a.global_batch_size} x {a.seq_length} tokens, "
              f"{base.precision}, --optimizer {a.optimizer}")
        print(f"searched {found.considered} layouts that divide the model and the batch: {len(found.fitting)} fit, "
              f"{found.too_big} do not fit, {found.not_runnable} are not runnable today (planning/layout.py RUNNABLE)")
        for n in notes:
            print(f"note: {n}")
        if not shown:
            best = found.best_unfitting
            if best is not None:
                print(f"nothing fits: the smallest runnable layout needs {report._fmt(best.memory.total)} per device "
                      f"({report.refusal(best).split('; ', 1)[1]})")
            return 1
        print(f"{'#':>3} {'TP':>3} {'PP':>3} {'EP':>3} {'SP':>3} {'DP':>5} {'ZeRO':>4} {'MB':>3} {'GAS':>4} {'recomp':>6} "
              f"{'memory/device':>14} {'peak at':>18} {'step s':>8} {'tokens/s':>12} {'node-hours':>11}")
        for i, x in enumerate(shown, 1):
            s, lay, t = x.setup, x.setup.layout, x.time
            print(f"{i:>3} {lay.tp:>3} {lay.pp:>3} {lay.ep:>3} {lay.sp:>3} {lay.dp:>5} {s.zero_stage:>4} "
                  f"{s.micro_batch:>3} {s.accumulation:>4} {'yes' if s.args.recompute_activations else 'no':>6} "
                  f"{report._fmt(x.memory.total):>14} {x.memory.phase:>18} "
                  f"{(f'{t.seconds:.3g}' if t.seconds else '?'):>8} "
                  f"{(f'{t.tokens_per_second:,.0f}' if t.tokens_per_second else '?'):>12} "
                  f"{(f'{t.node_hours:,.0f}' if t.node_hours else '?'):>11}")
            print(f"      {search.launcher_variables(x, model, device.per_node)}")
    if plt is not None:
        labels = [f"#{i} TP{x.setup.layout.tp} PP{x.setup.layout.pp} Z{x.setup.zero_stage} mb{x.setup.micro_batch}"
                  + (" rc" if x.setup.args.recompute_activations else "") for i, x in enumerate(shown, 1)]
        report.plot(shown, labels, opts.plot, plt)
        print(f"# wrote {opts.plot}", file=sys.stderr if opts.json else sys.stdout)
    return 0


def main(argv=None) -> int:  # python -m megatron_ext.commands.plan
    return run_argv(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
