#!/usr/bin/env bash
# Shell helpers for train_alcf.sh (source this file). The variable handling itself is Python
# (megatron_ext/launcher), where every rule is tested; this file only prepares the interpreter.

# On ALCF machines load the site's framework module first (it carries the accelerator build of
# torch); elsewhere use whatever python3 is on PATH. Then create/reuse the venv (setup_env.sh).
me_setup_python() {
    if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" ]] && command -v module >/dev/null 2>&1; then
        case "$(hostname -f 2>/dev/null || hostname)" in
            *aurora*|*sunspot*) module load frameworks >/dev/null 2>&1 || true ;;
            *polaris*|*sirius*) module use /soft/modulefiles >/dev/null 2>&1 || true
                                module load conda >/dev/null 2>&1 && conda activate >/dev/null 2>&1 || true ;;
        esac
    fi
    # shellcheck source=ALCF/setup_env.sh
    source "${MEGATRON_EXT_ROOT}/ALCF/setup_env.sh"
}
