"""Build and load fastllava's C++ CPU kernels once per machine, falling back to PyTorch's own ops without them.

The sources next to this file are compiled by ``torch.utils.cpp_extension`` (g++ and ninja) into
``$FASTLLAVA_CACHE or ~/.cache/fastllava/kernels/<torch>-<source hash>``, the first time a process needs them
(~15-30 s, once; ``python -m fastllava.kernels`` does it ahead of time, scripts/setup.sh calls it). The ops are
registered as ``torch.ops.fastllava.*``. They need an x86-64 CPU with AVX2 and FMA; elsewhere, with no compiler,
or with ``FASTLLAVA_KERNELS=0``, ``load()`` returns False and callers keep PyTorch's path (a warning says why,
once, when a build was attempted and failed).
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch

SOURCES = ("gemv.cpp", "gemv_avx512.cpp", "gemv_vnni.cpp", "resample.cpp", "attention.cpp", "attention_avx512.cpp",
           "prefill_attention.cpp", "pointwise.cpp", "attention_step.cpp", "decoder_layers.cpp", "int8_pairs.cpp")
HEADERS = ("vector_math.h", "vector_math_avx512.h", "gemv_avx512.h", "attention_avx512.h", "decode_ops.h")
_OPENMP = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-ffp-contract=off"] + _OPENMP
# -ffp-contract=off: a * b + c stays two roundings unless a kernel asks for an FMA by name (pointwise.cpp
# reproduces PyTorch's roundings).
# -fopenmp: at::parallel_for in torch's headers is OpenMP code, serial without it. The library then needs
# libgomp.so.1, which resolves to the copy torch has already loaded (same soname): one thread pool, sized by
# torch.set_num_threads.
_lock = threading.Lock()
_state: dict[str, bool] = {}


def kernels_enabled() -> bool:
    """``FASTLLAVA_KERNELS`` = 1 (default) or 0; anything else is an error that names the variable."""
    value = os.environ.get("FASTLLAVA_KERNELS", "1").strip().lower()
    if value not in ("0", "1", "true", "false", "on", "off", "yes", "no"):
        raise ValueError(f"FASTLLAVA_KERNELS={value!r}: expected 1 or 0")
    return value in ("1", "true", "on", "yes")


def cpu_supported() -> bool:
    """AVX2 + FMA, as PyTorch's own dispatch sees the CPU (its AVX2 level requires FMA too)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability == "AVX2" or capability.startswith("AVX512")


def build_directory() -> Path:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((here / name).read_bytes())
    digest.update(" ".join(_FLAGS).encode())
    digest.update(str(here.resolve()).encode())  # torch rebuilds when the source paths change: one dir per checkout
    root = Path(os.environ.get("FASTLLAVA_CACHE", Path.home() / ".cache" / "fastllava"))
    version = torch.__version__.replace("+", "_")
    return root / "kernels" / f"torch{version}-{digest.hexdigest()[:16]}"


def load() -> bool:
    """True when ``torch.ops.fastllava`` holds the kernels (built now if needed); False to use PyTorch ops."""
    if "loaded" in _state:
        return _state["loaded"]
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = kernels_enabled() and cpu_supported() and _build()
    return _state["loaded"]


def _build() -> bool:
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name="fastllava_kernels", sources=[str(Path(__file__).parent / s) for s in SOURCES],
                           extra_cflags=_FLAGS, extra_ldflags=_OPENMP,
                           build_directory=str(directory), is_python_module=False,
                           verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure (no compiler, no ninja, bad flags) falls back
        warnings.warn(f"fastllava: C++ kernels unavailable ({type(error).__name__}: {str(error)[:300]}); using "
                      "PyTorch's ops instead (slower decode on CPUs without bf16 arithmetic). Set "
                      "FASTLLAVA_KERNELS=0 to silence this.", RuntimeWarning, stacklevel=3)
        return False
    return True


def gemv_kernels_available() -> bool:
    """The few-row GEMV ops (``torch.ops.fastllava.gemv*``) can be used in this process (building them if needed)."""
    return load()
