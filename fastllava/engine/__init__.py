"""The serving engine: continuous batching over a shared model, prefix and image-embedding caches.

Public surface: ``SamplingParams``, ``RequestOutput``/``CompletionOutput`` (types.py), ``Engine`` (step-driven),
``AsyncEngine`` (thread-safe, awaitable, streaming) and the offline ``LLM`` API.
"""
