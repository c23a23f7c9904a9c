"""Decode weights in transparent huge pages.

Decoding reads every weight of the text model once per token, front to back. With 4 KiB pages that is a TLB miss
every 4 KiB: measured on an AVX2 EPYC (one thread, the 169 text-model matrices of llava-interleave-qwen-0.5b,
0.93 GB bf16), the C++ GEMV read them at 9.7 GB/s from ordinary memory and 13.9 GB/s from huge pages. Where the
kernel offers transparent huge pages only on request (``/sys/kernel/mm/transparent_hugepage/enabled`` =
``madvise``, a common default), memory must ask for them: so after loading, the text model's linear weights and
lm_head (their codes, when quantized) are copied into one anonymous mapping advised ``MADV_HUGEPAGE``, one tensor
at a time, each source released as soon as it is copied (the checkpoint's file pages through ``release``), so
peak memory grows by one tensor at most. Vision weights stay where they are: they are read in large GEMMs.

Decode KV caches (generation/kv_cache.py, engine/kv_pool.py) take their memory from the same kind of mapping
(``huge_page_tensor``): a step reads each head's rows of every layer, a few KiB per head at a 32 KiB or wider
stride, so with 4 KiB pages nearly every head's read started with a TLB miss.

``FASTLLAVA_HUGE_PAGES=0`` turns this off; it is skipped off Linux, off CPU, or where huge pages are disabled.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

HUGE_PAGE_BYTES = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line
_TRIM_EVERY = 32 << 20  # hand freed sources back to the OS every 32 MiB copied: peak memory stays ~flat
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Linux with transparent huge pages not disabled, and ``FASTLLAVA_HUGE_PAGES`` not 0."""
    choice = os.environ.get("FASTLLAVA_HUGE_PAGES", "1").strip().lower()
    if choice not in ("0", "1", "true", "false", "on", "off", "yes", "no"):
        raise ValueError(f"FASTLLAVA_HUGE_PAGES={choice!r}: expected 1 or 0")
    if choice in ("0", "false", "off", "no") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _THP_SETTING.read_text()
    except OSError:
        return False


def huge_page_bytes(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` zeroed bytes (uint8) starting on a 2 MiB boundary of an anonymous mapping advised
    ``MADV_HUGEPAGE``, or None where huge pages are unavailable. Views of it keep the mapping alive."""
    if not huge_pages_available():
        return None
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        region.close()
        return None
    base = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive as long as any view of it
    offset = -base.data_ptr() % HUGE_PAGE_BYTES  # huge pages cover 2 MiB-aligned ranges only
    return base[offset:offset + nbytes]


def huge_page_tensor(shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> torch.Tensor | None:
    """A zeroed contiguous CPU tensor in its own huge-page mapping (``huge_page_bytes``), or None (another device,
    or no huge pages)."""
    if torch.device(device).type != "cpu":
        return None
    memory = huge_page_bytes(math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    return None if memory is None else memory.view(dtype).view(shape)


def decode_weight_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, attribute) of every large tensor a decode step streams: the text model's linear layers and
    lm_head, as full-precision weights or quantized codes."""
    from fastllava.quantization import Int4Linear, Int8Linear

    candidates = [(f"model.language_model.{name}" if name else "model.language_model", module)
                  for name, module in model.model.language_model.named_modules()]
    candidates.append(("lm_head", model.lm_head))
    for name, module in candidates:
        if isinstance(module, Int4Linear):
            attr = "kernel_weight" if module.kernel == "int4pack" else "qweight"
        elif isinstance(module, (nn.Linear, Int8Linear)):
            attr = "weight"
        else:
            continue
        tensor = getattr(module, attr, None)
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and not tensor.is_meta:
            yield name, module, attr


def move_to_huge_pages(model: nn.Module, release: Callable[[str], None] | None = None) -> int:
    """Copy the decode weights into one huge-page-advised mapping; returns the bytes moved (0 when skipped).
    ``release(name)`` is called after each tensor ``name + "." + attribute`` is copied (to drop its file pages)."""
    if not huge_pages_available():
        return 0
    slots = list(decode_weight_slots(model))
    sizes: dict[int, int] = {}  # by address: tied weights (lm_head = embed_tokens) are moved once
    for _, module, attr in slots:
        tensor = getattr(module, attr)
        sizes[tensor.data_ptr()] = -(-tensor.nbytes // _ALIGN) * _ALIGN
    del tensor  # no reference may outlive its copy: each source is freed right after it is copied
    total = sum(sizes.values())
    base = huge_page_bytes(total) if total else None
    if base is None:
        return 0
    offset = 0
    from fastllava.quantization import return_free_memory

    done: set[int] = set()
    since_trim = 0
    for _, module, attr in slots:
        tensor = getattr(module, attr)
        if tensor.data_ptr() in done:
            continue
        view = base[offset:offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        offset += -(-tensor.nbytes // _ALIGN) * _ALIGN
        done.add(view.data_ptr())
        # every module holding it (a tied embedding too) follows; then its source pages can go
        for name in _replace_everywhere(model, tensor, view):
            if release is not None:
                release(name)
        since_trim += tensor.nbytes
        del tensor
        if since_trim >= _TRIM_EVERY:  # quantized sources are heap memory glibc keeps until asked
            return_free_memory()
            since_trim = 0
    return_free_memory()
    return total


def _replace_everywhere(model: nn.Module, old: torch.Tensor, view: torch.Tensor) -> list[str]:
    """Point every parameter/buffer that is ``old`` at ``view``; returns their names."""
    names = []
    for module_name, module in model.named_modules():
        for attr, tensor in list(module._parameters.items()):
            if tensor is not None and tensor.data_ptr() == old.data_ptr() and tensor.shape == old.shape:
                tensor.data = view  # the same Parameter object: ties to it still hold
                names.append(f"{module_name}.{attr}")
        for attr, tensor in list(module._buffers.items()):
            if tensor is not None and tensor.data_ptr() == old.data_ptr() and tensor.shape == old.shape:
                module._buffers[attr] = view
                names.append(f"{module_name}.{attr}")
    return names
