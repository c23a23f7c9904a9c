"""The scheduler: which tokens of which sequences the next step computes, within a token and a memory budget.

Contract: ``schedule()`` returns ``Chunk``s (a sequence and the token range [start, end) to compute); a chunk
that reaches the end of its sequence's tokens yields logits for the next token. Per step, in this order:
1. every running sequence that is decoding gets its one token (so streams keep moving whatever arrives);
2. running sequences part-way through their prompt get the next chunk of it (chunked prefill);
3. waiting sequences are admitted, oldest first, while there is token budget, a free slot (``max_num_seqs``)
   and memory: an admitted sequence first takes the longest cached prefix of its blocks (copying it, or adopting
   the storage of a finished sequence whose whole cached content it extends), so it computes only the rest. A
   sequence whose next block another scheduled prefill is computing right now waits a step instead of
   computing it twice (the n samples of one request, many questions about one new image).
Memory is grown per sequence as it needs it (kv_pool.py). When the budget is spent, cached prefixes of
finished sequences are evicted first (LRU); then the newest running sequence is preempted: its storage is
freed, it goes back to the front of the queue and is recomputed later (its generated tokens included, so the
output continues unchanged). A request is admitted only if it fits the budget alone, so the oldest sequence
always makes progress: nothing crashes and nothing is lost.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from dataclasses import dataclass

from fastllava.engine.kv_pool import KVPool, SequenceKV
from fastllava.engine.prefix_cache import PrefixCache
from fastllava.engine.request import Sequence, Status


@dataclass(eq=False)
class Chunk:
    seq: Sequence
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def wants_logits(self) -> bool:
        return self.end == len(self.seq.token_ids)


class _Running(list):
    """Running sequences ordered by priority (oldest request first)."""

    def add(self, seq: Sequence) -> None:
        insort(self, seq, key=lambda s: s.priority)


class Scheduler:
    def __init__(self, pool: KVPool, prefix_cache: PrefixCache, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs}): every "
                "running sequence needs room for its decode token in each step"
            )
        self.pool = pool
        self.prefix_cache = prefix_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running = _Running()
        self.preemptions = 0
        self._budget = 0
        self._scheduled: dict[Sequence, Chunk] = {}

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    # -- one step ------------------------------------------------------------------------------------------------
    def schedule(self) -> list[Chunk]:
        self._budget = self.max_num_batched_tokens
        self._scheduled = {}
        for decoding in (True, False):
            for seq in list(self.running):
                if self._budget == 0:
                    break
                if seq.status is not Status.RUNNING or seq in self._scheduled or (seq.remaining == 1) != decoding:
                    continue
                size = min(seq.remaining, self._budget)
                hint = len(seq.token_ids) + self.pool.block_size if not decoding else 0
                if self._reserve(seq, seq.num_computed + size, hint):
                    self._take(Chunk(seq, seq.num_computed, seq.num_computed + size))
        deferred = []
        while self.waiting and self._budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            outcome = self._admit(seq)
            if outcome == "defer":
                deferred.append(seq)
            elif outcome == "no-memory":
                self.waiting.appendleft(seq)
                break
        self.waiting.extendleft(reversed(deferred))
        chunks = list(self._scheduled.values())
        self._scheduled = {}
        return chunks

    def _take(self, chunk: Chunk) -> None:
        self._scheduled[chunk.seq] = chunk
        self._budget -= chunk.size

    def _reserve(self, seq: Sequence, needed: int, hint: int) -> bool:
        """Room for ``needed`` positions in a running sequence: evict cached prefixes, then preempt the newest."""
        while not self.pool.grow(seq.kv, needed, hint):
            if self.prefix_cache.evict_one():
                continue
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit(self, seq: Sequence) -> str:
        keys = seq.block_keys()
        block = self.pool.block_size
        max_blocks = (len(seq.token_ids) - 1) // block  # the last token is always computed (its logits)
        source, hit = self.prefix_cache.lookup(keys, max_blocks)
        if hit < max_blocks and self.prefix_cache.is_pending_elsewhere(keys[hit], seq):
            return "defer"
        for source, hit in ((source, hit), (None, 0)):
            kv = self._storage_for(seq, source, hit)
            if kv is not None:
                break
        else:
            return "no-memory"
        cached = hit * block
        kv.length = cached
        seq.kv, seq.num_computed = kv, cached
        self.prefix_cache.register(kv, keys, hit)
        self.prefix_cache.claim(seq, keys[hit:])
        if seq.index == 0 and not seq.request.cache_recorded:  # first admission of the request
            seq.request.cache_recorded = True
            seq.request.num_cached_tokens = cached
            self.prefix_cache.record(hit, len(seq.token_ids))
        seq.status = Status.RUNNING
        self.running.add(seq)
        size = min(seq.remaining, self._budget)
        self._take(Chunk(seq, cached, cached + size))
        return "admitted"

    def _storage_for(self, seq: Sequence, source: SequenceKV | None, hit: int) -> SequenceKV | None:
        """A storage with the first ``hit`` blocks of ``source`` and room for this step's chunk, or None."""
        cached = hit * self.pool.block_size
        needed = cached + min(seq.remaining - cached, self._budget)
        hint = len(seq.token_ids) + self.pool.block_size
        if source is not None and source.retired and hit == len(source.block_hashes):
            self.prefix_cache.adopt(source, hit)  # the next chat turn: take the finished turn's storage over
            source.limit = seq.limit
            if self._grow_for_admission(source, needed, hint, protect=None):
                return source
            self.prefix_cache.release(source)
            return None
        kv = self.pool.new(seq.limit)
        if not self._grow_for_admission(kv, needed, hint, protect=source):
            return None
        if source is not None:
            kv.copy_prefix_from(source, cached)
            self.prefix_cache.touch(source)
        return kv

    def _grow_for_admission(self, kv: SequenceKV, needed: int, hint: int, protect: SequenceKV | None) -> bool:
        """New sequences never preempt running ones; they may evict cached prefixes (except their source)."""
        while not self.pool.grow(kv, needed, hint):
            if not self.prefix_cache.evict_one(protect):
                return False
        return True

    # -- leaving the running set ---------------------------------------------------------------------------------
    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's memory and queue it first for recomputation."""
        self._drop(seq)
        chunk = self._scheduled.pop(seq, None)
        if chunk is not None:
            self._budget += chunk.size
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """A sequence ended: keep its blocks as a cached prefix (or free them when caching is off)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.prefix_cache.unclaim(seq, seq.keys)
            self.prefix_cache.register(seq.kv, seq.block_keys(), seq.num_computed // self.pool.block_size)
            self.prefix_cache.retire(seq.kv)
            seq.kv = None
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is; its memory is freed at once."""
        if seq.status is Status.RUNNING:
            self._drop(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def _drop(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.prefix_cache.unclaim(seq, seq.keys)
        self.prefix_cache.release(seq.kv)
        seq.kv, seq.num_computed = None, 0
