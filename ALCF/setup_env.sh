#!/usr/bin/env bash
# Create or reuse the Python environment megatron_ext runs in, then activate it (source this file).
#
#   VENV_DIR  where the virtual environment lives            [<repo>/.venv]
#   PYTHON    interpreter to build it from                   [python3]
#
# If the interpreter already has torch (an ALCF/cluster module, a conda env), the venv sees it
# (--system-site-packages) so the cluster's accelerator build is used. Otherwise torch is pinned
# to 2.13.0 first: an unpinned torch would pull a multi-GB CUDA build onto a CPU machine.
# Nothing is re-installed when megatron_ext already imports.
_me_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${VENV_DIR:=${_me_repo}/.venv}"
: "${PYTHON:=python3}"

# Finds the packages without importing them (importing megatron.core alone takes seconds).
_me_has_packages() {
    python -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('megatron_ext', 'deepspeed', 'megatron.core')) else 1)" 2>/dev/null
}

_me_setup_env() {
    if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]] && _me_has_packages; then
        return 0  # already in an environment that has the package
    fi
    if [[ ! -x "${VENV_DIR}/bin/python" ]]; then
        local flags=()
        if "${PYTHON}" -c "import torch" 2>/dev/null; then flags+=(--system-site-packages); fi
        echo "[setup_env] creating virtual environment ${VENV_DIR} ${flags[*]}" >&2
        "${PYTHON}" -m venv "${flags[@]}" "${VENV_DIR}" || return 1
    fi
    # shellcheck disable=SC1091
    source "${VENV_DIR}/bin/activate" || return 1
    if _me_has_packages \
        && [[ "$(python -c 'import importlib.util as u, os; print(os.path.dirname(os.path.dirname(u.find_spec("megatron_ext").origin)))')" == "${_me_repo}" ]]; then
        return 0
    fi
    echo "[setup_env] installing megatron_ext and its pinned dependencies into ${VENV_DIR}" >&2
    python -m pip install -q --upgrade pip >&2 || return 1
    python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" >&2 || return 1
    # DS_BUILD_OPS=0: DeepSpeed compiles nothing at install; on CPU we never need its kernels.
    DS_BUILD_OPS=0 python -m pip install -q -e "${_me_repo}[test]" >&2 || return 1
}
_me_setup_env || { echo "[setup_env] error: could not set up the Python environment in ${VENV_DIR}" >&2; return 1 2>/dev/null || exit 1; }
