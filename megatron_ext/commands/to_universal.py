"""``megatron-ext to-universal RUN_DIR | --input_folder CK/global_stepN [--output_folder OUT]``:
convert a checkpoint to DeepSpeed's universal format (loads at any data-parallel and
tensor-parallel size with ``--universal-checkpoint``); the conversion is
``megatron_ext/training/universal.py``. ``tools/ds_to_universal.py`` is this command under
DeepSpeed's name, with DeepSpeed's own flags (``--keep_temp_folder``, ``--num_merge_workers``,
``--num_extract_workers``, ``--no_strict``) as the ALCF guide types them."""
import argparse
import contextlib
import os
import sys

from megatron_ext.argtypes import one_line_errors

PASS_THROUGH = True  # parsed by the converter's own parser


def add_parser(sub):
    sub.add_parser("to-universal", help="convert a checkpoint to DeepSpeed's universal format (any DP/TP size)",
                   add_help=False)


def run_argv(argv) -> int:
    return main(argv, prog="megatron-ext to-universal")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Convert a megatron_ext (DeepSpeed ZeRO 1, 2 or 3) checkpoint to DeepSpeed's universal format, "
                    "which loads at any data-parallel and tensor-parallel size (--universal-checkpoint). "
                    "Details: docs/checkpoints.md.")
    one_line_errors(p)
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="a run's --save directory: converts its 'latest' checkpoint (or give --input_folder)")
    p.add_argument("--load", dest="load_dir", default=None, metavar="DIR", help="same as RUN_DIR")
    p.add_argument("--input_folder", "--input-folder", default=None, metavar="CK/global_stepN",
                   help="the checkpoint folder to convert")
    p.add_argument("--output_folder", "--output-folder", default=None, metavar="OUT",
                   help="where to write (default: <input folder>_universal); 'latest_universal' is written "
                        "beside it, so keep it inside the directory you will --load")
    p.add_argument("--num_extract_workers", "--num-extract-workers", type=int, default=1,
                   help="processes extracting ZeRO partitions (DeepSpeed's option)")
    p.add_argument("--num_merge_workers", "--num-merge-workers", type=int, default=None,
                   help="processes merging tensor-parallel slices (DeepSpeed's option; default half the extract "
                        "workers)")
    p.add_argument("--keep_temp_folder", "--keep-temp-folder", action="store_true",
                   help="keep OUT/tmp, the extracted partition slices (DeepSpeed's option, for debugging)")
    p.add_argument("--no_strict", "--no-strict", dest="strict", action="store_false",
                   help="tolerate parameter patterns that match no parameter (DeepSpeed's option)")
    p.add_argument("--verbose", action="store_true", help="show the converter's own output")
    return p


def main(argv=None, prog: str = "ds_to_universal.py") -> int:
    from megatron_ext.checkpoint_layout import CheckpointFileError, find_checkpoint
    from megatron_ext.training.universal import ConversionError, ConverterOptions, convert, describe

    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    given = [x for x in (ns.run_dir, ns.load_dir, ns.input_folder) if x]
    if len(given) > 1:
        parser.error("give one of RUN_DIR, --load DIR or --input_folder CK/global_stepN")
    if not given:
        parser.error("nothing to convert: give --input_folder CK/global_stepN, or a run directory (RUN_DIR or --load DIR)")
    for flag, value in (("--num_extract_workers", ns.num_extract_workers), ("--num_merge_workers", ns.num_merge_workers)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: give at least 1")
    options = ConverterOptions(extract_workers=ns.num_extract_workers, merge_workers=ns.num_merge_workers,
                               keep_temp_folder=ns.keep_temp_folder, strict=ns.strict)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # library start-up chatter; stdout is the summary
            # (convert refuses an --input_folder that is not a directory)
            tag_dir = ns.input_folder or os.path.join(*find_checkpoint(ns.run_dir or ns.load_dir))
            summary = convert(tag_dir, ns.output_folder, options, verbose=ns.verbose)
    except (ConversionError, CheckpointFileError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0
