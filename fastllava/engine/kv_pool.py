"""KV memory of the engine: one contiguous, growable tensor per sequence, drawn from a byte budget.

Contract: ``KVPool(num_layers, num_kv_heads, head_dim, dtype, device, budget_bytes, block_size)`` hands out
``SequenceKV`` storages. A storage holds ``(layers, 2, H_kv, capacity, D)`` (keys at ``[:, 0]``, values at
``[:, 1]``); ``length`` positions of it are valid. ``pool.grow(kv, needed, hint)`` makes room for ``needed``
positions (preferring ``hint``), in whole blocks of ``block_size`` tokens, and returns False instead of going
over the budget: the scheduler then evicts cached prefixes or preempts a sequence. ``pool.free(kv)`` returns
the bytes at once. Memory therefore grows with each sequence's real length, never with a worst case.

Why contiguous per-sequence tensors and not a paged block pool (measured on this 2-core AVX2 CPU with
``benchmarks/bench_engine.py --only kv-layout``, one thread; 16 KV heads x 64 as in the llava-interleave-0.5b
text model, one decode query, one layer): SDPA over a strided view of a contiguous per-sequence tensor takes
0.14 ms (256 cached tokens) / 0.26 ms (800) in fp32, while first gathering the sequence's 16-token blocks out
of a shared 16k-token pool takes 1.6 / 10.7 ms (12-41x; gathering single slots 0.18 / 0.87 ms, 1.3-3.3x); in
bf16 the gather adds 31-43 % (0.54 -> 0.71 ms, 1.87 -> 2.67 ms). That gather would repeat for every layer of
every sequence at every step: without a paged-attention kernel on CPU, paging only moves bytes (the C++ decode
attention, kernels/attention.cpp, reads the same strided per-sequence views). What paging buys (no fragmentation, sharing) is kept where it matters: capacity
is accounted and grown in blocks (growth copies are amortised: +25 % or at least 4 blocks at a time, never past
the sequence's own limit), and prefix sharing copies a cached prefix once at admission (or adopts a retired
storage outright), which costs milliseconds against the seconds its prefill would take.
"""

from __future__ import annotations

import torch

from fastllava.models.huge_pages import huge_page_tensor


class SequenceKV:
    """Keys and values of one sequence; positions [0, length) are valid."""

    def __init__(self, pool: "KVPool", limit: int):
        self.pool = pool
        self._data: torch.Tensor | None = None  # (layers, 2, H_kv, capacity, D)
        self._layer_views: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.capacity = 0
        self.length = 0
        self.limit = limit  # the most positions this storage may ever need (prompt + max_tokens)
        self.block_hashes: list[bytes] = []  # hashes of the full blocks registered in the prefix cache
        self.retired = False

    @property
    def data(self) -> torch.Tensor | None:
        return self._data

    @data.setter
    def data(self, value: torch.Tensor | None) -> None:
        self._data, self._layer_views = value, None  # views of the old storage must not keep it alive

    @property
    def nbytes(self) -> int:
        return self.capacity * self.pool.bytes_per_token

    def layer_views(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's keys and values as (1, H_kv, capacity, D) views, made once per storage (a lean decode
        step reads them all each token; building 2 x layers views costs ~0.1 ms)."""
        if self._layer_views is None:
            layers = self._data.shape[0]
            self._layer_views = ([self._data[i, 0].unsqueeze(0) for i in range(layers)],
                                 [self._data[i, 1].unsqueeze(0) for i in range(layers)])
        return self._layer_views

    def write(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store key/value (1, H_kv, T, D) of one layer at positions [start, start + T)."""
        end = start + key.shape[2]
        self.data[layer, 0, :, start:end].copy_(key[0])
        self.data[layer, 1, :, start:end].copy_(value[0])

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H_kv, end, D) strided views of keys and values [0, end) (no copy)."""
        return self.data[layer, 0, :, :end].unsqueeze(0), self.data[layer, 1, :, :end].unsqueeze(0)

    def copy_prefix_from(self, other: "SequenceKV", tokens: int) -> None:
        self.data[:, :, :, :tokens].copy_(other.data[:, :, :, :tokens])


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, budget_bytes: int, block_size: int):
        self.shape = (num_layers, 2, num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_size = block_size
        self.bytes_per_token = num_layers * 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self.peak_bytes = 0
        if self.budget_tokens < block_size:
            raise ValueError(
                f"kv_cache_bytes={budget_bytes} holds fewer than one block of {block_size} tokens "
                f"({self.bytes_per_token} bytes per token); give the engine more KV memory"
            )

    @property
    def budget_tokens(self) -> int:
        return self.budget_bytes // self.bytes_per_token

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def new(self, limit: int) -> SequenceKV:
        return SequenceKV(self, limit)

    def _round(self, tokens: int) -> int:
        return -(-tokens // self.block_size) * self.block_size

    def grow(self, kv: SequenceKV, needed: int, hint: int = 0) -> bool:
        """Make ``kv`` hold at least ``needed`` positions (``hint`` or +25 % if the budget allows); False if not."""
        if needed <= kv.capacity:
            return True
        ceiling = self._round(max(kv.limit, needed))
        generous = max(hint, kv.capacity + max(kv.capacity // 4, 4 * self.block_size))
        for target in (min(self._round(max(needed, generous)), ceiling), self._round(needed)):
            extra = (target - kv.capacity) * self.bytes_per_token
            if extra <= self.free_bytes:
                self._resize(kv, target)
                return True
        return False

    def _resize(self, kv: SequenceKV, capacity: int) -> None:
        layers, two, heads, dim = self.shape
        # on a CPU in huge pages where offered (as generate()'s caches: a decode step reads every head's rows)
        data = huge_page_tensor((layers, two, heads, capacity, dim), self.dtype, self.device)
        if data is None:
            data = torch.empty(layers, two, heads, capacity, dim, dtype=self.dtype, device=self.device)
        if kv.data is not None and kv.length:
            data[:, :, :, : kv.length].copy_(kv.data[:, :, :, : kv.length])
        self.used_bytes += (capacity - kv.capacity) * self.bytes_per_token
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        kv.data, kv.capacity = data, capacity

    def free(self, kv: SequenceKV) -> None:
        self.used_bytes -= kv.nbytes
        kv.data, kv.capacity, kv.length = None, 0, 0
        kv.block_hashes = []
