#!/usr/bin/env bash
# Set up, then ask the bundled demo model about the bundled image (no network needed after setup).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- "What colour is the circle?"
fi
exec .venv/bin/fastllava chat "$@"
