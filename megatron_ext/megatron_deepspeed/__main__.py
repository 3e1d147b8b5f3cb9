"""``python -m megatron_ext.megatron_deepspeed [--plugins all|new] SCRIPT.py [its flags]``: run a
Megatron-DeepSpeed entry point (``pretrain_gpt_alcf.py``, ``pretrain_gpt.py``...) with the plug-ins
on, as ``python SCRIPT.py [its flags]`` would run it (same ``sys.argv``, ``sys.path[0]`` and
``__main__``). The mode defaults to ``MEGATRON_EXT_PLUGINS``, else ``all``."""
import os
import runpy
import sys

from megatron_ext.megatron_deepspeed.activation import install

USAGE = "usage: python -m megatron_ext.megatron_deepspeed [--plugins all|new] SCRIPT.py [its flags]"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = None
    if argv and argv[0].startswith("--plugins"):
        flag = argv.pop(0)
        if "=" in flag:
            mode = flag.split("=", 1)[1]
        elif argv:
            mode = argv.pop(0)
        else:
            print(f"{USAGE}\nerror: --plugins needs a value", file=sys.stderr)
            return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 0 if argv else 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f"megatron_ext: error: no such entry point: {script}", file=sys.stderr)
        return 2
    install(mode)
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
