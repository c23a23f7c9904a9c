"""Skipping random initialisation while a model is built on the meta device (before loading a checkpoint).

torch's layers initialise their parameters in their constructors. On meta tensors that work is pointless (the
checkpoint overwrites every parameter, and a missing one is an error), yet not free: ``normal_`` on a meta
tensor imports torch._dynamo on first use, seconds of load time. While active, the ``torch.nn.init``
functions return their tensor untouched. The patch is process-wide, so it is guarded by a lock and always
undone.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_",
                   "xavier_normal_", "constant_", "zeros_", "ones_", "orthogonal_")
_lock = threading.Lock()


def _untouched(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return tensor


@contextmanager
def skip_init_on_meta() -> Iterator[None]:
    """No-op parameter initialisation, but only when the default device is meta."""
    if torch.empty(()).device.type != "meta":
        yield
        return
    with _lock:
        saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
        try:
            for name in _INIT_FUNCTIONS:
                setattr(torch.nn.init, name, _untouched)
            yield
        finally:
            for name, function in saved.items():
                setattr(torch.nn.init, name, function)
