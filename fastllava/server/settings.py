"""ServerSettings: every limit and option of the HTTP server in one place (the CLI fills it from its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastllava.server.media import MediaPolicy

MiB = 1 << 20


@dataclass
class ServerSettings:
    model_name: str = "fastllava"  # the id clients send as "model" and /v1/models lists
    api_key: str | None = None  # None: no authentication (the server binds to 127.0.0.1 by default)
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_running_requests: int = 8  # what the engine runs at once (its max_num_seqs); n counts n
    max_queued_requests: int = 64  # admitted beyond those; more gets 503 + Retry-After, before any work
    max_body_bytes: int = 32 * MiB  # a 20 MiB image is 27 MiB as a data URL
    max_concurrent_bodies: int | None = None  # requests with a body handled at once (None: max_in_flight + 8)
    request_timeout: float = 600.0  # seconds from arrival to the last token; then aborted (504 / SSE error)
    default_max_tokens: int | None = None  # chat requests without max_tokens (None: until the context is full)
    max_n: int = 16
    retry_after: int = 1  # seconds, in 503 answers
    max_model_len: int | None = None  # reported by /v1/models and /tokenize (else read from the engine)
    trusted_hosts: frozenset[str] | None = None  # Host header names accepted (None: any); DNS-rebinding guard

    @property
    def max_in_flight(self) -> int:
        return self.max_running_requests + self.max_queued_requests

    @property
    def body_concurrency(self) -> int:
        return self.max_concurrent_bodies or self.max_in_flight + 8
