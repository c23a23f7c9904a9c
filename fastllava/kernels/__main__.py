"""``python -m fastllava.kernels``: build the C++ kernels now (setup does this so the first answer does not wait)."""

import sys
import time

from fastllava.kernels.build import build_directory, load

start = time.perf_counter()
ok = load()
print(f"fastllava kernels: {'ready' if ok else 'not available (PyTorch ops will be used)'} "
      f"in {time.perf_counter() - start:.1f} s ({build_directory()})")
sys.exit(0)
