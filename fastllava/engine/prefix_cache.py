"""Content-addressed prefix KV cache over full token blocks; image hashes are folded into the block keys.

Contract: ``block_hashes(token_ids, images, block_size, salt, parent)`` gives one 16-byte key per full block;
the key of block i is blake2b(key of block i-1, the block's token ids, the hash and offset of every image
whose placeholders fall in the block). Equal keys therefore mean an equal prefix *including the pixels* behind
the image placeholders (the placeholder ids alone are the same for every image), as vLLM's extra keys and
SGLang's pad values do. A 128-bit digest makes accidental collisions negligible, so hits are not re-verified.

``PrefixCache`` maps keys to (storage, block index) for blocks that are computed, in running sequences'
storages (live) and in storages of finished sequences kept as evictable entries (``retire``; LRU order,
``evict_one`` frees the oldest). ``lookup`` returns the storage holding the longest cached prefix. ``pending``
marks blocks that a scheduled prefill is about to compute, so that the scheduler can hold back a request that
would compute the same blocks again in the same step (the n samples of one request, or many questions about
one picture arriving together) until they are cached. With prefix caching disabled the engine salts the keys
with the request id: only the samples of one request then share their prompt's KV.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Sequence

from fastllava.engine.kv_pool import KVPool, SequenceKV

ImageSpan = tuple[int, int, bytes]  # (first placeholder index, end index, image hash)


def block_hashes(token_ids: Sequence[int], images: Sequence[ImageSpan], block_size: int, salt: bytes = b"",
                 parent: bytes | None = None, start_block: int = 0) -> list[bytes]:
    """Keys of the full blocks of ``token_ids`` from ``start_block`` on (``parent`` = key of the block before)."""
    keys = []
    if parent is None:
        parent = hashlib.blake2b(b"fastllava-prefix|" + salt, digest_size=16).digest()
    for block in range(start_block, len(token_ids) // block_size):
        start, end = block * block_size, (block + 1) * block_size
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", token_ids[start:end]).tobytes())
        for first, last, image_hash in images:
            if first < end and last > start:
                h.update(image_hash)
                h.update((first - start).to_bytes(8, "little", signed=True))
        parent = h.digest()
        keys.append(parent)
    return keys


class PrefixCache:
    def __init__(self, pool: KVPool, enabled: bool = True):
        self.pool = pool
        self.enabled = enabled
        self.blocks: dict[bytes, tuple[SequenceKV, int]] = {}
        self.retired: OrderedDict[int, SequenceKV] = OrderedDict()
        self.pending: dict[bytes, object] = {}
        self.hits = self.misses = 0  # lookups (per admitted sequence) that found / did not find a cached prefix
        self.hit_tokens = self.queried_tokens = 0
        self.evictions = 0

    @property
    def retired_bytes(self) -> int:
        return sum(kv.nbytes for kv in self.retired.values())

    def lookup(self, keys: Sequence[bytes], max_blocks: int) -> tuple[SequenceKV | None, int]:
        """The storage holding the longest prefix of ``keys`` (at most ``max_blocks``) and that many blocks."""
        found, count = None, 0
        for index, key in enumerate(keys[:max_blocks]):
            entry = self.blocks.get(key)
            if entry is None:
                break
            found, count = entry[0], index + 1
        return found, count

    def record(self, hit_blocks: int, total_tokens: int) -> None:
        block = self.pool.block_size
        self.queried_tokens += total_tokens
        self.hit_tokens += hit_blocks * block
        if hit_blocks:
            self.hits += 1
        else:
            self.misses += 1

    def register(self, kv: SequenceKV, keys: Sequence[bytes], upto_blocks: int) -> None:
        """Publish the blocks [len(kv.block_hashes), upto_blocks) of ``kv`` (now computed) under ``keys``."""
        for index in range(len(kv.block_hashes), min(upto_blocks, len(keys))):
            key = keys[index]
            kv.block_hashes.append(key)
            self.blocks.setdefault(key, (kv, index))
            self.pending.pop(key, None)

    def unregister(self, kv: SequenceKV, from_block: int = 0) -> None:
        """Withdraw ``kv``'s blocks from ``from_block`` on (they are about to be overwritten or freed)."""
        for key in kv.block_hashes[from_block:]:
            entry = self.blocks.get(key)
            if entry is not None and entry[0] is kv:
                del self.blocks[key]
        del kv.block_hashes[from_block:]

    # -- retired storages (finished sequences kept for reuse) ---------------------------------------------------
    def retire(self, kv: SequenceKV) -> None:
        if not self.enabled or not kv.block_hashes:
            self.release(kv)
            return
        kv.retired = True
        self.retired[id(kv)] = kv

    def adopt(self, kv: SequenceKV, keep_blocks: int) -> None:
        """Take a retired storage back for a new sequence that reuses its first ``keep_blocks`` blocks."""
        del self.retired[id(kv)]
        kv.retired = False
        self.unregister(kv, keep_blocks)
        kv.length = keep_blocks * self.pool.block_size

    def evict_one(self, protect: SequenceKV | None = None) -> bool:
        """Free the least recently used retired storage (never ``protect``); False if there is none."""
        victim = next((kv for kv in self.retired.values() if kv is not protect), None)
        if victim is None:
            return False
        kv = self.retired.pop(id(victim))
        kv.retired = False
        self.evictions += 1
        self.release(kv)
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass

    def release(self, kv: SequenceKV) -> None:
        self.unregister(kv)
        self.pool.free(kv)

    def touch(self, kv: SequenceKV) -> None:
        if kv.retired:
            self.retired.move_to_end(id(kv))

    # -- blocks that a scheduled prefill is about to compute -------------------------------------------------------
    def claim(self, owner: object, keys: Sequence[bytes]) -> None:
        for key in keys:
            if key not in self.blocks:
                self.pending.setdefault(key, owner)

    def unclaim(self, owner: object, keys: Sequence[bytes]) -> None:
        for key in keys:
            if self.pending.get(key) is owner:
                del self.pending[key]

    def is_pending_elsewhere(self, key: bytes, owner: object) -> bool:
        claimant = self.pending.get(key)
        return claimant is not None and claimant is not owner
