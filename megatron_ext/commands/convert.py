"""``megatron-ext convert CHECKPOINT --output LOAD_DIR``: a Megatron-DeepSpeed (ALCF fork)
checkpoint into one megatron_ext's trainer loads, or one of ours into one the fork loads (the
direction is read from the checkpoint; the fork's pipeline model, GPTModelPipe, included); both with
``--load LOAD_DIR --universal-checkpoint``, at any data-, tensor- and pipeline-parallel size. See megatron_ext/megatron_deepspeed/checkpoints.py and
docs/megatron_deepspeed.md."""
import contextlib
import sys


def add_parser(sub):
    p = sub.add_parser("convert", help="move a checkpoint between Megatron-DeepSpeed and megatron_ext (either way)",
                       description=__doc__)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a run's --save directory (its 'latest' checkpoint) or a global_stepN folder; ZeRO 1 or 2")
    p.add_argument("--output", "-o", required=True, metavar="LOAD_DIR",
                   help="the directory the other trainer will --load: gets <tag>_universal and latest_universal")
    p.add_argument("--optimizer-groups", choices=["fork", "roles"], default=None,
                   help="ours -> fork: the param-group layout of the fork run that loads it: 'fork' (default; the "
                        "fork's own optimizers, and megatron_ext's element-wise ones under MEGATRON_EXT_PLUGINS) or "
                        "'roles' (megatron_ext's muon/shampoo or muP/CompleteP under MEGATRON_EXT_PLUGINS)")
    p.add_argument("--fork-model", choices=["GPTModel", "GPTModelPipe"], default=None,
                   help="ours -> fork: the model class of the fork run that loads it, whose parameter names differ: "
                        "'GPTModel' (default; the fork run with --no-pipeline-parallel) or 'GPTModelPipe' (its "
                        "pipeline model, the fork's default: at any --pipeline-model-parallel-size)")
    p.add_argument("--num-workers", type=int, default=1, help="processes for DeepSpeed's converter")
    p.add_argument("--verbose", action="store_true", help="show DeepSpeed's converter output")
    p.set_defaults(func=run)


def run(args) -> int:
    from megatron_ext.checkpoint_layout import CheckpointFileError
    from megatron_ext.megatron_deepspeed.checkpoints import ConvertError, convert, describe

    if args.num_workers < 1:
        print(f"megatron-ext convert: error: --num-workers {args.num_workers}: give at least 1", file=sys.stderr)
        return 2
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library start-up chatter; stdout is the summary
            summary = convert(args.checkpoint, args.output, args.optimizer_groups, args.num_workers, args.verbose,
                              args.fork_model)
    except (ConvertError, CheckpointFileError) as e:  # a damaged file of the checkpoint: one line naming it
        print(f"megatron-ext convert: error: {e}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0
