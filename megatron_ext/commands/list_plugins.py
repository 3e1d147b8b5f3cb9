"""``megatron-ext list``: every registered plug-in by family, with its description and flags."""


def add_parser(sub):
    p = sub.add_parser("list", help="list registered plug-ins (optimizers, schedules, parametrizations)")
    p.add_argument("-v", "--verbose", action="store_true", help="show each flag with its default and help")
    p.set_defaults(func=run)


def run(args) -> int:
    from megatron_ext import registry

    for _, reg in sorted(registry.families().items()):
        print(f"{reg.title}:")
        for plugin in reg.plugins():
            aliases = f" (aliases: {', '.join(plugin.aliases)})" if plugin.aliases else ""
            print(f"  {plugin.name:<22} {plugin.description}{aliases}")
            if args.verbose:
                print(f"      engine: {plugin.engine.describe()}")
            if plugin.arguments and args.verbose:
                for arg in plugin.arguments:
                    default = arg.kwargs.get("default")
                    print(f"      {', '.join(arg.flags)} (default {default}): {arg.kwargs.get('help', '')}")
            elif plugin.arguments:
                print(f"      flags: {' '.join(plugin.flag_names())}")
        print()
    return 0
