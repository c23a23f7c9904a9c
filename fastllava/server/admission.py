"""Bounded admission: a request takes its place (weight n) before any fetch, decode or tokenization, or gets a 503.

``Admission.admit(weight)`` returns a ``Ticket`` or raises the 503 ``APIError`` (with Retry-After); the ticket is
released exactly once, when the answer is complete, failed, or its client went away. Single event loop, no locks.
"""

from __future__ import annotations

from typing import Callable

from fastllava.server.errors import overloaded


class Ticket:
    def __init__(self, admission: "Admission", weight: int):
        self._admission = admission
        self.weight = weight
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release(self.weight)


class Admission:
    def __init__(self, capacity: int, retry_after: int = 1, on_change: Callable[[int], None] = lambda n: None):
        self.capacity = capacity
        self.retry_after = retry_after
        self.in_flight = 0
        self._on_change = on_change

    def admit(self, weight: int = 1) -> Ticket:
        # A request heavier than the whole capacity is still admitted when the server is idle (else never).
        if self.in_flight + weight > self.capacity and self.in_flight > 0:
            raise overloaded(f"The server is at capacity ({self.in_flight} requests in flight, limit "
                             f"{self.capacity}); retry later", self.retry_after)
        self.in_flight += weight
        self._on_change(self.in_flight)
        return Ticket(self, weight)

    def _release(self, weight: int) -> None:
        self.in_flight -= weight
        self._on_change(self.in_flight)
