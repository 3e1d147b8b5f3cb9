"""``megatron-ext``: the project's command-line tools."""
import argparse
import sys


def cmd_list(args) -> int:
    """Print every registered plug-in by family, with its description and flags."""
    from megatron_ext import registry

    for family, reg in sorted(registry.families().items()):
        print(f"{reg.title}:")
        for plugin in reg.plugins():
            aliases = f" (aliases: {', '.join(plugin.aliases)})" if plugin.aliases else ""
            print(f"  {plugin.name:<22} {plugin.description}{aliases}")
            if plugin.arguments and args.verbose:
                for arg in plugin.arguments:
                    default = arg.kwargs.get("default")
                    print(f"      {', '.join(arg.flags)} (default {default}): {arg.kwargs.get('help', '')}")
            elif plugin.arguments:
                print(f"      flags: {' '.join(plugin.flag_names())}")
        print()
    return 0


def cmd_train(rest) -> int:
    from megatron_ext.train import main

    return main(rest)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="megatron-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered plug-ins (optimizers, schedules, parametrizations)")
    p.add_argument("-v", "--verbose", action="store_true", help="show each flag with default and help")
    p.set_defaults(func=cmd_list)
    sub.add_parser("train", help="train (same flags as python -m megatron_ext.train)", add_help=False)
    if argv[:1] == ["train"]:
        return cmd_train(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
