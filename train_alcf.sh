#!/usr/bin/env bash
# megatron_ext's launcher, driven by the environment variables of Megatron-DeepSpeed's train_alcf.sh:
#
#   VAR=... bash train_alcf.sh [extra trainer flags]
#
# Extra flags always win over what the variables produce. With no variables at all on a machine
# without an accelerator it trains a small llama-style model on a Shakespeare corpus (the demo);
# run it again and it resumes from its checkpoint. DRY_RUN=1 prints the resolved settings and the
# exact command, and starts nothing. Every variable: README.md ("train_alcf.sh variables").
set -euo pipefail
MEGATRON_EXT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MEGATRON_EXT_ROOT
# shellcheck source=ALCF/helpers.sh
source "${MEGATRON_EXT_ROOT}/ALCF/helpers.sh"
me_setup_python
cd "${MEGATRON_EXT_ROOT}"
exec python -m megatron_ext.launcher "$@"
