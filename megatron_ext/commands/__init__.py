"""``megatron-ext`` subcommands, one module each. A module defines ``add_parser(subparsers)``, which
adds its subparser and sets ``func`` (called with the parsed namespace, returns an exit code).
``cli.py`` finds them by listing this folder, so a new command is one new file.

A command module imports the rest of the package inside its functions: ``cli.py`` imports every
command module to build its parser, and one command's work (torch, megatron-core, DeepSpeed,
transformers) must not load for another, or for a one-line usage error."""
from typing import Any, List, Tuple
from megatron_ext.argtypes import normalise_argv, one_line_errors


def parse_own_options(parser, argv, normalise: bool = True) -> Tuple[Any, List[str]]:
    """A pass-through command's own options, its errors one line (exit 2, no usage): ``(options,
    the rest: training flags)``; ``-h/--help`` prints the help and exits 0."""

    one_line_errors(parser)
    opts, rest = parser.parse_known_args(normalise_argv(list(argv)) if normalise else list(argv))
    if opts.help:
        parser.print_help()
        raise SystemExit(0)
    return opts, rest


def split_at_double_dash(argv) -> Tuple[List[str], List[str]]:
    """``[own options] -- [training flags]`` -> (own options, training flags)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
