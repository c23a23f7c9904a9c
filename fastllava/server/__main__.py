"""``python -m fastllava.server ...``: the same as ``fastllava serve ...``."""

import sys

from fastllava.server.cli import serve_main

sys.exit(serve_main(sys.argv[1:]))
