#!/usr/bin/env bash
# One-command set-up and run on a fresh machine:
#   bash launch/run.sh demo [args]   # create .venv, install, run the tiny default main job on CPU
#   bash launch/run.sh test [args]   # create .venv, install, run the test suite
# Installs torch==2.13.0 (the CPU build on machines like ours) only when no torch >= 2.4 is importable
# in the venv; GLM_ENGINE_VENV picks another venv directory.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-}"; shift || true
case "$what" in demo|test) ;; *) echo "usage: bash launch/run.sh {demo|test} [args]" >&2; exit 2 ;; esac

venv="${GLM_ENGINE_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$py" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 4))' 2>/dev/null; then
    "$py" -m pip install -q "torch==2.13.0"
fi
# setuptools < 80: newer ones turn `develop` into an isolated PEP 517 build that cannot see pybind11
"$py" -m pip install -q "setuptools>=64,<80" wheel "pybind11>=2.10"
# --no-build-isolation: setup.py needs the torch and pybind11 installed above to decide what to build
"$py" -m pip install -q --no-build-isolation -e ".[test]"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$what" = demo ]; then
    exec "$py" -m launch.demo "$@"
fi
set +e
"$py" -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing (exit 5 is not a success)" >&2
    exit 1
fi
exit "$rc"
