#!/usr/bin/env bash
# Set up (with the test dependencies and Debian's Chromium for the web page tests), then run the whole test
# suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium" >&2
  else
    echo "warning: chromium is missing and this is not root; install it with: sudo apt-get install chromium" >&2
  fi
fi
if command -v chromium >/dev/null 2>&1 || [ -n "${CI:-}" ]; then
  export FASTLLAVA_REQUIRE_BROWSER=1  # present (or in CI): the browser tests must run, not skip
fi
exec .venv/bin/python -m pytest -q "$@"
