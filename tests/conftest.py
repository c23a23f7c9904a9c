"""Shared fixtures: tiny oracle checkpoints are built once per test session (transformers makes them)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """family -> directory of a tiny transformers-made checkpoint (built once per session)."""
    from tiny_checkpoints import make_checkpoint

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_checkpoint(tmp_path_factory.mktemp(family), family)
        return made[family]

    return get


@pytest.fixture(params=["fastllava-gemv", "torch-ops"])
def cpu_kernels(request, monkeypatch):
    """Run a test with fastllava's C++ GEMV kernels and again with PyTorch's ops only (FASTLLAVA_KERNELS=0's
    path). The kernels must build here: a machine without g++/ninja fails the first variant, it is not skipped."""
    from fastllava.kernels import build

    if request.param == "torch-ops":
        monkeypatch.setitem(build._state, "loaded", False)
    else:
        assert build.load(), "fastllava's C++ kernels did not build (see the warning above): g++ and ninja needed"
    return request.param
