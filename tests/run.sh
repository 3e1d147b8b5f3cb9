#!/usr/bin/env bash
# The project's test command: sets up the environment (ALCF/setup_env.sh) and runs the suite.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -m "not slow"` or `-k registry`).
set -euo pipefail
cd "$(dirname "$0")/.."
source ALCF/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -p no:cacheprovider "$@"
