"""``python -m megatron_ext.launcher [extra trainer flags]`` (what ``train_alcf.sh`` runs).

Resolves the environment variables, prints the settings table and the exact command, builds the
demo corpus when no DATA_FILE_LIST is given, writes the run directory (``.env``,
``train_args.txt``, ``launch.sh``, ``ds_config.json``) and replaces itself with the launch
command. ``DRY_RUN=1`` stops after printing and writes nothing.
"""
import json
import os
import shlex
import sys

from megatron_ext.fileio import write_text_atomically
from megatron_ext.arguments import build_parser
from megatron_ext.launcher.demo import prepare
from megatron_ext.launcher.help import launcher_help
from megatron_ext.launcher.resolve import LaunchError, resolve, settings_table
from megatron_ext.platform.known_warnings import silence_known_warnings


def _write(path: str, text: str, mode: int = 0o644) -> None:
    write_text_atomically(path, text, mode)


def main(argv=None) -> int:

    silence_known_warnings()

    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:

        print(launcher_help() + build_parser(prog="train_alcf.sh").format_help())
        return 0
    repo = os.environ.get("MEGATRON_EXT_ROOT") or os.getcwd()
    try:
        launch = resolve(os.environ, argv, repo)
    except LaunchError as e:
        print(f"train_alcf.sh: error: {e}", file=sys.stderr)
        return 2
    print(settings_table(launch), flush=True)
    if os.environ.get("DRY_RUN", "").lower() in ("1", "true", "yes"):
        if launch.ds_config is not None:
            print("DeepSpeed config (generated):\n" + json.dumps(launch.ds_config, indent=2))
        print("DRY_RUN=1: nothing was started or written.")
        return 0
    if launch.refusal:  # the memory plan: it cannot fit (docs/memory_plan.md)
        print(f"train_alcf.sh: error: {launch.refusal}", file=sys.stderr)
        return 2

    if not launch.files_checked:  # the demo corpus is built on first use, then planned with its files

        prepare(**launch.demo_corpus)
        try:
            launch = resolve(os.environ, argv, repo, check_files=True)
        except LaunchError as e:
            print(f"train_alcf.sh: error: {e}", file=sys.stderr)
            return 2
        if launch.refusal:  # planned again with the demo's own tokenizer
            print(f"train_alcf.sh: error: {launch.refusal}", file=sys.stderr)
            return 2

    os.makedirs(launch.run_dir, exist_ok=True)
    env_lines = [f"{k.replace(' ', '_').replace('/', '_').replace('(', '').replace(')', '')}={shlex.quote(v)}"
                 for k, v in launch.env.items()]
    _write(os.path.join(launch.run_dir, ".env"), "# resolved by train_alcf.sh\n" + "\n".join(env_lines) + "\n")
    _write(os.path.join(launch.run_dir, "train_args.txt"), "\n".join(launch.trainer_argv) + "\n")
    _write(os.path.join(launch.run_dir, "launch.sh"),
           "#!/usr/bin/env bash\n# the exact command train_alcf.sh ran\n" + shlex.join(launch.command) + "\n", 0o755)
    if launch.ds_config is not None:
        _write(launch.ds_config_path, json.dumps(launch.ds_config, indent=2) + "\n")
    if "deepspeed" == os.path.basename(launch.command[0]) and "--hostfile" in launch.command:
        hosts = launch.env.get("NGPU_PER_HOST", "1")
        src = os.environ.get("HOSTFILE") or os.environ.get("PBS_NODEFILE")
        with open(src) as f:
            names = list(dict.fromkeys(l.split()[0] for l in f if l.strip()))
        _write(os.path.join(launch.run_dir, "hostfile_deepspeed"), "".join(f"{h} slots={hosts}\n" for h in names))
    sys.stdout.flush()
    os.execvp(launch.command[0], launch.command)


if __name__ == "__main__":
    sys.exit(main())
