"""``megatron-ext`` subcommands, one module each. A module defines ``add_parser(subparsers)``, which
adds its subparser and sets ``func`` (called with the parsed namespace, returns an exit code).
``cli.py`` finds them by listing this folder, so a new command is one new file."""
from typing import List, Tuple


def split_at_double_dash(argv) -> Tuple[List[str], List[str]]:
    """``[own options] -- [training flags]`` -> (own options, training flags)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
