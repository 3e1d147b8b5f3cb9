"""``megatron-ext init-report [training flags]``: build the model the flags describe and print,
per parameter family, the init std asked for next to the std measured on the built weights.

Same parser, parametrization and model builder as the trainer, one process, no data needed."""
from __future__ import annotations

import sys

PASS_THROUGH = True


def add_parser(sub):
    sub.add_parser("init-report", add_help=False,
                   help="print requested vs measured init std of each parameter family for training flags")


def run_argv(argv) -> int:
    import warnings

    from megatron_ext.arguments import normalise_argv
    from megatron_ext.plan import parse_plan

    argv = normalise_argv(list(argv))
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0
    if not any(a.split("=")[0] in ("--mock-data", "--data-path", "--data-file-list") for a in argv):
        argv.append("--mock-data")  # the model does not need data; the parser wants a source
    if not any(a.split("=")[0] in ("--train-iters", "--train-samples", "--train-tokens") for a in argv):
        argv += ["--train-iters", "1"]  # nor a training length
    plan = parse_plan(argv, world_size=1)
    args = plan.args
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps

    from megatron_ext.models.gpt import build_model
    from megatron_ext.parametrizations.common.report import format_init_report, init_report_rows
    from megatron_ext.platform import init_distributed
    from megatron_ext.training.trainer import set_seeds

    init_distributed(args.distributed_backend)
    ps.initialize_model_parallel()
    set_seeds(args.seed)
    parametrization = plan.parametrization
    model = build_model(args, plan.tokenizer.vocab_size, parametrization)
    print(format_init_report(init_report_rows(model, parametrization), parametrization))
    sys.stdout.flush()
    return 0
