#!/usr/bin/env bash
# Create ./.venv (once) with the CPU build of torch 2.13 and fastllava installed in editable mode.
# Usage: scripts/setup.sh [extra]   e.g. scripts/setup.sh test   installs the test dependencies too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and pinned: an unpinned resolve would fetch a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
else
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
fi
# Build the C++ CPU kernels now (~15-30 s, once per machine) so the first answer does not wait for them; a
# machine without a compiler prints that PyTorch's ops will be used instead.
.venv/bin/python -m fastllava.kernels
