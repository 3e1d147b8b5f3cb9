"""``megatron-ext``: the project's command-line tools (one module each in ``megatron_ext/commands``)."""
import argparse
import importlib
import pkgutil
import sys

from megatron_ext import commands
from megatron_ext.argtypes import one_line_errors


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{commands.__name__}.{info.name}")


def main(argv=None) -> int:
    # the platform package brings torch: importing the CLI (to list its commands) does not need it
    from megatron_ext.platform.known_warnings import silence_known_warnings

    silence_known_warnings()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="megatron-ext", description=__doc__)
    one_line_errors(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pass_through = {}
    for module in _command_modules():
        before = set(sub.choices)
        module.add_parser(sub)
        if getattr(module, "PASS_THROUGH", False):
            for name in set(sub.choices) - before:
                pass_through[name] = module
    if argv and argv[0] in pass_through:  # commands that parse their own (trainer) flags
        return pass_through[argv[0]].run_argv(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
