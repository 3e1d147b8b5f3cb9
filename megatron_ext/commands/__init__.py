"""``megatron-ext`` subcommands, one module each. A module defines ``add_parser(subparsers)``, which
adds its subparser and sets ``func`` (called with the parsed namespace, returns an exit code).
``cli.py`` finds them by listing this folder, so a new command is one new file."""
