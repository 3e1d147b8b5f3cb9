"""Several trainer runs in one torchrun (``conftest.run_layouts``): each rank runs every argv list
of a JSON file in turn through ``megatron_ext.train.run`` (the trainer re-lays its process groups
out when a run's layout differs from the one before), so the ranks start Python and import the
stack once for all of them.

    torchrun --nproc_per_node 4 tests/layout_runs.py runs.json
"""
import json
import sys


def main(path: str) -> int:
    from megatron_ext.platform.known_warnings import silence_known_warnings
    from megatron_ext.train import close_process_group, run

    silence_known_warnings()
    with open(path) as f:
        runs = json.load(f)
    try:
        for argv in runs:
            print(f"layout_runs: {' '.join(argv)}", flush=True)
            code = run(argv)
            if code:
                return code
    finally:
        close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
