"""The serving engine: continuous batching over a shared model, prefix and image-embedding caches.

Public surface: ``SamplingParams``, ``RequestOutput``/``CompletionOutput`` (types.py), ``Engine`` (step-driven,
engine.py), ``AsyncEngine`` (thread-safe, awaitable, streaming; async_engine.py) and the offline ``LLM`` API
(llm.py). Names are imported lazily so that the request types stay cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SamplingParams": "fastllava.engine.types",
    "RequestOutput": "fastllava.engine.types",
    "CompletionOutput": "fastllava.engine.types",
    "TokenLogprob": "fastllava.engine.types",
    "Engine": "fastllava.engine.engine",
    "RequestError": "fastllava.engine.inputs",
    "AsyncEngine": "fastllava.engine.async_engine",
    "EngineOverloadedError": "fastllava.engine.async_engine",
    "EngineError": "fastllava.engine.async_engine",
    "EngineDeadError": "fastllava.engine.async_engine",
    "LLM": "fastllava.engine.llm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fastllava.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
