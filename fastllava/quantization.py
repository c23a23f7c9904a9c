"""Weight-only int8 / int4 quantization of LLaVA's linear layers, streamed from the checkpoint while it loads.

Contract. ``QuantizationConfig(weights="int8"|"int4", group_size=32|64|128|256, modules=..., skip_modules=...)``
(also a plain dict of those fields, the string "int8"/"int4", or any object shaped like transformers'
``BitsAndBytesConfig``: its ``load_in_8bit`` / ``load_in_4bit`` / ``llm_int8_skip_modules`` attributes are read
by duck typing, transformers is never imported) is passed as ``from_pretrained(..., quantization_config=...)``.
The model is built on the meta device, the target modules are swapped for quantized ones, and each target
weight is quantized as its tensor arrives from the memory-mapped checkpoint; the file pages of the source are
released at once, so no full-precision copy of the quantized part of the model is ever resident. Activations
keep the model's dtype (bf16 / fp16 / fp32); only weights are stored in 8 or 4 bits.

Formats. int8: symmetric per output channel, ``w ~= q * scale`` with q in [-127, 127] (``weight`` int8 (N, K),
``scales`` (N,)). int4: asymmetric per group of ``group_size`` input columns, in torch's int4-kernel
convention ``w ~= (q - 8) * scale + zero`` with q in [0, 15] (saved as ``qweight`` uint8 (N, K/2), two nibbles a
byte, low nibble = even column; ``scales`` and ``zeros`` (N, K/group)). The token embedding table, when
quantized, is int8 per row (a lookup gathers rows; the embedding of a model whose lm_head is tied to it is
quantized exactly when lm_head is). Scales are rounded to the model dtype before the codes are computed, so the
stored codes are the best ones for the scales actually used. ``save_pretrained`` writes these tensors plus a
``quantization_config`` entry in config.json; ``from_pretrained`` sees that entry and loads the codes as they
are (no re-quantization: reloading gives identical logits). Which modules are quantized, and how, is read
back from the checkpoint's keys.

Groups for ``modules``: "language_model" (the decoder's linear layers), "embed_tokens", "lm_head" (these
three are the default), "vision_tower", "multi_modal_projector"; any other entry is a glob over module names
(fastllava's ``model.language_model.layers.0.mlp.down_proj`` or the hub's ``language_model.model.layers.0...``)
that must match at least one linear layer. ``skip_modules`` keeps modules in full precision (exact name,
prefix, last name components such as "lm_head", or glob). An int4 layer whose input width is not a multiple of
the group size stays in full precision (a warning names it).

Kernels (CPU; measured by benchmarks/bench_quantization.py on these 2-core AMD EPYC (Zen 3, AVX2, no
AVX-512) machines, torch 2.13, one-row GEMV, time relative to eager bf16 ``F.linear``, best of 3 interleaved
rounds while the machine was shared with other jobs, so the ratios are what counts):

    shape (N x K)        int8 ``_weight_int8pack_mm``   int4 ``_weight_int4pack_mm_for_cpu`` (group 64)
    1024 x 1024          1.9x faster                     1.4x faster
    2816 x 1024          3.8x faster                     3.7x faster
    1024 x 2816          2.2x faster                     2.0x faster
    152000 x 1024        1.2x faster                     1.7x faster      (lm_head of llava-interleave-qwen-0.5b)

At 744 rows (a prefill) the packed kernels were 3.1-4.2x (int8) and 3.2-5.7x (int4) faster than bf16 here, where
bf16 GEMM has no native support (AVX2), and a dequantize-then-``F.linear`` path was 0.8-2x: slower than the packed
kernels at every shape and row count measured. So on CPU every quantized layer uses its packed kernel, lm_head
included, for decode and prefill alike. The dequantize-then-matmul path (``kernel = "dequant"``) is the one used
on CUDA and other devices (no CPU-only assumptions: any shape, any floating activation dtype) and on CPU
wherever a packed kernel cannot take the layer: int4 needs the output width to be a multiple of 16 and the
group size in {32, 64, 128, 256}; activations in a dtype other than bf16/fp16/fp32 use it too. The numbers
above come from one kind of machine: on CPUs with fast bf16 GEMM (AMX) a prefill through dequantize-then-GEMM
may win, which was not measured here; ``set_kernel(model, "dequant")`` switches a loaded model over.

int4 decode (fewer than ``KERNEL_MAX_ROWS`` rows, fastllava's C++ kernels built) has two kernels, named by
``Int4Linear.kernel``: ``"gemv_q8"`` (the default, ``Int4Linear.decode_kernel``) quantizes each activation row
to int8 per block of 32 columns once per call and takes integer dot products with the 4-bit codes
(``torch.ops.fastllava.gemv_int4_q8``, llama.cpp's Q4_0 x Q8_0 idea); ``"gemv"`` keeps float32 activations
(``gemv_int4``: exact against the dequantized weights up to float32 sums). Set ``Int4Linear.decode_kernel =
"gemv"`` before loading (or ``set_kernel(model, "auto")`` after), or a layer's ``kernel``, to use the float one.
Measured one thread on this 2-core EPYC while it ran other jobs (so the spread is wide), bf16 activations,
group 64, weights cycled through > 100 MB (beyond the caches), three interleaved runs, speed-up of gemv_q8 over
gemv: 2816x1024 1.1-1.6x at 1 row / 1.4-1.8x at 4 rows (typical 17 vs 11 G weights/s at 1 row); 1024x2816
1.3-1.9x / 1.5-1.8x; 3072x1024 1.4-1.5x / 1.9-2.3x; lm_head 152000x1024 1.5-2.0x (8.1-8.7 vs 12.5-18 ms,
~9.5 GB/s of codes) / 1.5-1.9x (one outlier run 0.85x). Accuracy on the tiny oracle checkpoints of
tests/test_quantization.py (relative max logit error of int4 against the unquantized model, all products through
the GEMV, fp32 and bf16, groups 32/64): 0.098-0.179 with either kernel (ratio q8 / float 0.96-1.04), top-1
agreement within +-0.05, and the two kernels' logits differ by 0.006-0.012. The codes' -8 meets the sum of the
int8 activations and the zeros the float sum: using the float sum for both (activation rounding against the
uncentred codes 0..15) made that difference 0.014-0.033.

On CPUs with AVX512-VNNI (Zen 4, Ice Lake and newer) and input widths that are a multiple of 128, the int8 and
int4 GEMVs take fastllava/kernels/gemv_vnni.cpp's VPDPBUSD loops: ``gemv_int4_q8`` with the same activation
rounding as above (same results up to float32 sums); ``gemv_int8`` and ``gemv_int4`` with bf16/fp16 activations
as two int8 parts per 128 columns, whose rounding (<= max|x| / 32512 per block) is below the activations' own, so
int8 stays "activations in their own dtype" in effect; float32 activations keep the exact float loops. Measured
(one thread, Zen 4, llava-interleave-qwen-0.5b decode): int8 30.7 -> 42.0 tok/s, int4 41.4 -> 54.3 tok/s
(benchmarks/bench_quantization.py).
"""

from __future__ import annotations

import fnmatch
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fastllava.kernels.build import gemv_kernels_available
from fastllava.models.half_matmul import Linear, few_row_kernel_applies

QUANT_METHOD = "fastllava"
FORMAT_VERSION = 1
WEIGHT_KINDS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 64
GROUPS = {
    "language_model": "the text decoder's linear layers (attention q/k/v/o and MLP gate/up/down projections)",
    "embed_tokens": "the token embedding table (int8 per row)",
    "lm_head": "the output projection to the vocabulary",
    "vision_tower": "the vision encoder's linear layers",
    "multi_modal_projector": "the two projector layers",
}
DEFAULT_MODULES = ("language_model", "embed_tokens", "lm_head")
KERNEL_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT4_DECODE_KERNELS = ("gemv_q8", "gemv")  # int8-quantized / float32 activations in fastllava's int4 GEMV
DEFAULT_INT4_DECODE_KERNEL = "gemv_q8"
_CHUNK_ELEMENTS = 1 << 22  # rows are quantized in chunks of ~4M weights: fp32 temporaries stay ~16 MB
_BNB_KEYS = ("load_in_8bit", "load_in_4bit")


class QuantizationError(ValueError):
    """A quantization request or a quantized checkpoint that fastllava cannot honour."""


# ----------------------------------------------------------------------------------------------------------
# Config


def _names(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise QuantizationError(f"{field} must be a list of module names or groups, got {value!r}") from None
    if not all(isinstance(name, str) and name for name in names):
        raise QuantizationError(f"{field} must hold non-empty strings, got {value!r}")
    return names


@dataclass
class QuantizationConfig:
    """What to quantize and how; see the module docstring for the formats and the groups."""

    weights: str = "int8"
    group_size: int | None = None
    modules: tuple[str, ...] = DEFAULT_MODULES
    skip_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str) or self.weights.lower() not in WEIGHT_KINDS:
            raise QuantizationError(f"weights must be one of {WEIGHT_KINDS}, got {self.weights!r}")
        self.weights = self.weights.lower()
        if self.weights == "int4":
            if self.group_size is None:
                self.group_size = DEFAULT_INT4_GROUP_SIZE
            if isinstance(self.group_size, bool) or self.group_size not in INT4_GROUP_SIZES:
                raise QuantizationError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}")
        elif self.group_size is not None:
            raise QuantizationError(
                "int8 weights are quantized per output channel; group_size applies to int4 only: leave it unset"
            )
        self.modules = _names(self.modules, "modules")
        if not self.modules:
            raise QuantizationError(f"modules is empty: name at least one of the groups {list(GROUPS)} or a pattern")
        self.skip_modules = _names(self.skip_modules, "skip_modules")

    @property
    def quant_method(self) -> str:
        return QUANT_METHOD

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "weights": self.weights,
                "group_size": self.group_size, "modules": list(self.modules), "skip_modules": list(self.skip_modules)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantizationConfig":
        data = dict(data)
        if any(key in data for key in _BNB_KEYS) or data.get("quant_method") == "bitsandbytes":
            return cls._from_bitsandbytes(lambda name, default=None: data.get(name, default))
        method = data.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise QuantizationError(f"quant_method {method!r} is not supported; fastllava quantizes with its own "
                                    "int8/int4 formats (quant_method 'fastllava') or reads BitsAndBytes-style flags")
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise QuantizationError(f"quantization format_version {version} is newer than this fastllava "
                                    f"understands ({FORMAT_VERSION}); upgrade fastllava")
        fields = ("weights", "group_size", "modules", "skip_modules")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise QuantizationError(f"unknown quantization_config fields {unknown}; the fields are {list(fields)}")
        return cls(**data)

    @classmethod
    def _from_bitsandbytes(cls, get: Callable[..., Any]) -> "QuantizationConfig":
        """transformers' BitsAndBytesConfig flags: 8-bit -> int8; 4-bit (nf4 or fp4) -> int4, group 64."""
        eight, four = bool(get("load_in_8bit", False)), bool(get("load_in_4bit", False))
        if eight and four:
            raise QuantizationError("BitsAndBytes-style config sets both load_in_8bit and load_in_4bit; choose one")
        if not (eight or four):
            raise QuantizationError("BitsAndBytes-style config sets neither load_in_8bit nor load_in_4bit")
        skip = get("llm_int8_skip_modules", None) or ()
        return cls(weights="int8" if eight else "int4", skip_modules=skip)

    @classmethod
    def coerce(cls, value: Any) -> "QuantizationConfig":
        """A QuantizationConfig from any accepted spelling; a clear error for anything else."""
        if isinstance(value, QuantizationConfig):
            return value
        if isinstance(value, str):
            return cls(weights=value)
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if any(hasattr(value, key) for key in _BNB_KEYS):
            return cls._from_bitsandbytes(lambda name, default=None: getattr(value, name, default))
        raise QuantizationError(
            f"quantization_config must be a fastllava.QuantizationConfig, a dict of its fields, 'int8'/'int4' or a "
            f"BitsAndBytesConfig-like object with load_in_8bit/load_in_4bit, got {type(value).__name__}"
        )


# ----------------------------------------------------------------------------------------------------------
# Quantization math (row chunks: the fp32 temporaries of a 152000-row lm_head stay small)


def _row_chunks(rows: int, cols: int, align: int = 1) -> Iterable[tuple[int, int]]:
    step = max(align, _CHUNK_ELEMENTS // max(cols, 1) // align * align)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _positive_scales(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales rounded to the storage dtype, never zero (an all-zero row keeps codes 0)."""
    scales = scales.to(dtype)
    return torch.where(scales > 0, scales, torch.full_like(scales, torch.finfo(dtype).tiny))


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 codes (N, K) and per-row scales (N,) with weight ~= codes * scales[:, None]."""
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, dtype=scale_dtype, device=weight.device)
    for start, end in _row_chunks(rows, cols):
        chunk = weight[start:end]
        # max/min are exact in any float dtype: reduce before widening, then one fp32 pass for the codes
        amax = torch.maximum(chunk.amax(dim=1), -chunk.amin(dim=1)).float()
        scale = _positive_scales(amax / 127.0, scale_dtype)
        scales[start:end] = scale
        work = chunk.to(torch.float32, copy=True).mul_(scale.float().reciprocal()[:, None])
        codes[start:end] = work.round_().clamp_(-127, 127)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype,
                  kernel_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed codes uint8 (N, K/2), scales and zeros (N, K/group): w ~= (q - 8) * s + z.

    With ``kernel_rows`` (N rounded up to the kernel's tile of 16), the codes come out in torch's CPU kernel
    layout for that many rows (zero rows past N), converted chunk by chunk: no plain copy of the layer is made."""
    rows, cols = weight.shape
    if cols % group_size or cols % 2:
        raise QuantizationError(f"int4 needs the input width ({cols}) to be a multiple of group_size ({group_size})")
    groups = cols // group_size
    packed = None if kernel_rows else torch.empty(rows, cols // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(rows, groups, dtype=scale_dtype, device=weight.device)
    zeros = torch.empty(rows, groups, dtype=scale_dtype, device=weight.device)
    for start, end in _row_chunks(rows, cols, align=_KERNEL_ROW_BLOCK):
        chunk = weight[start:end].reshape(end - start, groups, group_size)  # (n, G, g)
        low, high = (t.float() for t in torch.aminmax(chunk, dim=-1))
        scale = _positive_scales((high - low) / 15.0, scale_dtype)
        zero = (low + 8.0 * scale.float()).to(scale_dtype)  # the value code 8 stands for
        scales[start:end], zeros[start:end] = scale, zero
        # q = (w - zero) / scale + 8 = w / scale + (8 - zero / scale)
        inverse = scale.float().reciprocal()
        work = chunk.to(torch.float32, copy=True).mul_(inverse[..., None]).add_((8.0 - zero.float() * inverse)[..., None])
        q = work.round_().clamp_(0, 15).to(torch.uint8).reshape(end - start, cols)
        if kernel_rows:
            packed = _write_kernel_tiles(packed, q, start, end == rows, kernel_rows)
        else:
            packed[start:end] = pack_nibbles(q)
    return packed, scales, zeros


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 values 0..15 -> (N, K/2) bytes, low nibble = even column."""
    if sys.byteorder == "little":  # a pair of bytes read as int16 is even + 256 * odd: one contiguous pass
        pairs = codes.contiguous().view(torch.int16)
        return (pairs | (pairs >> 4)).to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N, K) uint8 values 0..15."""
    codes = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 15, out=codes[:, 0::2])
    torch.bitwise_right_shift(packed, 4, out=codes[:, 1::2])
    return codes


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, groups = scales.shape
    codes = unpack_nibbles(packed).reshape(rows, groups, -1).to(dtype)  # (N, G, g)
    return ((codes - 8) * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]).reshape(rows, -1)


_KERNEL_ROW_BLOCK = 256  # a multiple of every row tile torch's int4 CPU packing uses (32 on AVX2, 64 on AVX-512)


def _write_kernel_tiles(out: torch.Tensor | None, codes: torch.Tensor, start: int, last: bool,
                        kernel_rows: int) -> torch.Tensor:
    """Convert a (n, K) block of codes (rows from ``start``, a multiple of the kernel tile) into ``out``, the
    (kernel_rows, ...) kernel-layout tensor (allocated on the first block); the last block gets the zero rows."""
    if last and start + codes.shape[0] < kernel_rows:
        codes = torch.cat([codes, codes.new_full((kernel_rows - start - codes.shape[0], codes.shape[1]), 8)])
    tiles = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    if out is None:
        out = tiles.new_empty((kernel_rows, *tiles.shape[1:]))
    out[start:start + tiles.shape[0]] = tiles
    return out


def _int4_kernel_layout(packed: torch.Tensor, kernel_rows: int | None = None) -> torch.Tensor:
    """Plain nibbles (N, K/2) -> the CPU kernel's tiled layout for ``kernel_rows`` >= N rows (default N; zero
    rows past N), which depends on the CPU's vector width; converted in row chunks of whole kernel tiles."""
    rows, half = packed.shape
    out = None
    for start, end in _row_chunks(rows, 2 * half, align=_KERNEL_ROW_BLOCK):
        out = _write_kernel_tiles(out, unpack_nibbles(packed[start:end]), start, end == rows, kernel_rows or rows)
    return out


_PLAIN_ORDERS: dict[tuple[int, int], torch.Tensor] = {}


def _kernel_to_plain_order(rows: int, cols: int) -> torch.Tensor:
    """For a (rows, cols) block: the index, among the kernel layout's nibbles, of each plain position
    (row * cols + col). Learned by packing probes whose codes are the hex digits of their own positions."""
    key = (rows, cols)
    if key not in _PLAIN_ORDERS:
        positions = torch.arange(rows * cols, dtype=torch.int64)
        source = torch.zeros(rows * cols, dtype=torch.int64)  # kernel nibble i holds plain position source[i]
        digit = 0
        while (1 << (4 * digit)) < rows * cols:
            probe = ((positions >> (4 * digit)) & 15).to(torch.int32).view(rows, cols)
            packed = torch._convert_weight_to_int4pack_for_cpu(probe, 2)
            source |= unpack_nibbles(packed).reshape(-1).to(torch.int64) << (4 * digit)
            digit += 1
        order = torch.empty_like(source)
        order[source] = positions
        _PLAIN_ORDERS[key] = order
    return _PLAIN_ORDERS[key]


def _int4_plain_from_kernel(kernel_weight: torch.Tensor, rows: int, cols: int, group_size: int) -> torch.Tensor:
    """Plain nibbles back from the kernel's layout, by row blocks (the layout is learned, not assumed), checked
    by packing the result again; should that ever differ, a slow path that needs no knowledge of the layout
    reads the codes through the kernel itself."""
    plain = torch.empty(rows, cols // 2, dtype=torch.uint8)
    block = _KERNEL_ROW_BLOCK
    for start, end in _row_chunks(rows, cols, align=block):
        whole = start + (end - start) // block * block
        for first, last, size in ((start, whole, block), (whole, end, end - whole)):
            if last > first:  # (blocks, size * cols) nibbles in kernel order -> plain order, one gather
                nibbles = unpack_nibbles(kernel_weight[first:last]).view(-1, size * cols)
                codes = nibbles.index_select(1, _kernel_to_plain_order(size, cols))
                plain[first:last] = pack_nibbles(codes.view(last - first, cols))
    if torch.equal(_int4_kernel_layout(plain), kernel_weight):
        return plain
    return _int4_plain_through_kernel(kernel_weight, rows, cols, group_size)


def _int4_plain_through_kernel(kernel_weight: torch.Tensor, rows: int, cols: int, group_size: int) -> torch.Tensor:
    """With scale 1 and zero 8 the kernel computes x @ codes.T, so identity rows (fp32, exact for the integers
    0..15) read the codes back: O(cols^2 * rows) work, the fallback only."""
    unit = torch.empty(cols // group_size, rows, 2, dtype=torch.float32)
    unit[..., 0], unit[..., 1] = 1.0, 8.0
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(rows, 1))
    for start in range(0, cols, step):
        end = min(cols, start + step)
        eye = torch.zeros(end - start, cols, dtype=torch.float32)
        eye[torch.arange(end - start), torch.arange(start, end)] = 1.0
        block = torch._weight_int4pack_mm_for_cpu(eye, kernel_weight, group_size, unit)  # (c, N)
        codes[:, start:end] = block.round().to(torch.uint8).T
    return pack_nibbles(codes)


# ----------------------------------------------------------------------------------------------------------
# Modules


class QuantizedModule(nn.Module):
    """Common base: ``kernel`` names the forward path ("int8pack" / "int4pack" on CPU, else "dequant")."""

    kernel = "dequant"

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"

    def finish_load(self) -> None:
        """Called once all tensors are in: pick the kernel for the device the weights are on."""


def _flat(x: torch.Tensor, width: int) -> torch.Tensor:
    return x.reshape(-1, width)


PAIR_BLOCK = 128  # the int8 pair layout's block of columns (kernels/int8_pairs.cpp)


def _row_major(codes: torch.Tensor, paired: bool) -> torch.Tensor:
    """int8 codes in row-major order: ``codes`` themselves, or a row-major copy of codes in the pair layout."""
    if not paired:
        return codes
    rows = codes.clone()
    torch.ops.fastllava.int8_pairs_(rows, False)
    return rows


class Int8Linear(QuantizedModule):
    """Weight-only int8 linear layer: per-output-channel symmetric codes, activations in their own dtype.

    The state (and the saved format) is row-major codes. On a CPU with AVX512-VNNI, ``use_pair_layout`` stores them
    in the decode kernel's pair layout (kernel ``gemv_pairs``, kernels/int8_pairs.cpp: the same bytes, two rows'
    blocks side by side); ``state_dict``, ``dequantize`` and many-row products read a row-major copy.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    def finish_load(self) -> None:
        if self.kernel == "gemv_pairs":
            return
        self.kernel = "int8pack" if self.weight.device.type == "cpu" else "dequant"
        if self.kernel == "int8pack" and gemv_kernels_available():
            self.kernel = "gemv"

    def pair_layout_applies(self) -> bool:
        return (self.kernel == "gemv" and self.out_features % 2 == 0 and self.in_features % PAIR_BLOCK == 0
                and self.weight.is_contiguous())

    def to_pairs(self) -> None:
        """Codes into the pair layout, in place (see the class docstring)."""
        if self.kernel != "gemv_pairs":
            if not self.pair_layout_applies():
                raise QuantizationError(f"the int8 pair layout does not apply to this layer ({self.extra_repr()})")
            torch.ops.fastllava.int8_pairs_(self.weight, True)
            self.kernel = "gemv_pairs"

    def to_rows(self) -> None:
        """Codes back in row-major order, in place (a tied head: ``use_row_layout``, which tells the embedding)."""
        if self.kernel == "gemv_pairs":
            torch.ops.fastllava.int8_pairs_(self.weight, False)
            self.kernel = "gemv"

    def row_codes(self) -> torch.Tensor:
        """The codes row-major (a copy when the layer holds the pair layout)."""
        return _row_major(self.weight, self.kernel == "gemv_pairs")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.row_codes().to(dtype) * self.scales.to(dtype)[:, None]

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel == "gemv_pairs":
            destination[prefix + "weight"] = self.row_codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        paired = self.kernel == "gemv_pairs"
        if paired:  # the saved codes are row-major: copy them over row-major codes, then pair again
            self.to_rows()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if paired:
            self.to_pairs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = _flat(x, self.in_features)
        gemv = self.kernel in ("gemv", "gemv_pairs") and x.dtype in KERNEL_FLOAT_DTYPES
        if gemv and few_row_kernel_applies(x, self.weight, x.shape[0]):
            op = torch.ops.fastllava.gemv_int8_pairs if self.kernel == "gemv_pairs" else torch.ops.fastllava.gemv_int8
            out = op(x, self.weight, self.scales, self.bias)
            return out.reshape(*shape[:-1], self.out_features)
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        if gemv or (self.kernel == "int8pack" and x.device.type == "cpu" and x.dtype in KERNEL_FLOAT_DTYPES):
            out = torch._weight_int8pack_mm(x.contiguous(), self.row_codes(), scales)
        else:  # per-row scales commute with the matmul: scale the (M, N) output, not the (N, K) weight
            out = F.linear(x, self.row_codes().to(x.dtype)) * scales
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {super().extra_repr()}")


class Int4Linear(QuantizedModule):
    """Weight-only int4 linear layer: group-wise asymmetric codes.

    The state (and the saved format) is plain: ``qweight`` (N, K/2) nibbles, ``scales``/``zeros`` (N, K/group).
    On CPU ``finish_load`` converts it into the kernel's tiled layout (``kernel_weight``, ``kernel_scales_zeros``
    (K/group, N', 2), N' = N rounded up to the kernel's tile of 16 with zero rows that are sliced off the output)
    and drops the plain copy; ``state_dict`` converts back, so what is saved never depends on the CPU it was
    loaded on.
    """

    decode_kernel = DEFAULT_INT4_DECODE_KERNEL  # the few-row kernel ``finish_load`` picks on CPU ("gemv_q8" / "gemv")

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, device: Any = None):
        super().__init__()
        if in_features % group_size:
            raise QuantizationError(f"int4 needs in_features ({in_features}) divisible by group_size ({group_size})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    def kernel_supported(self, device: torch.device | str) -> bool:
        """Whether the layer runs on torch's int4 CPU kernel (its tiled layout): on CPU when fastllava's own
        GEMV kernels (which read the plain layout) could not be built."""
        return (torch.device(device).type == "cpu" and self.group_size in INT4_GROUP_SIZES
                and not gemv_kernels_available())

    @property
    def kernel_rows(self) -> int:
        """Rows of the kernel layout: the kernel takes whole tiles of 16 outputs (zero rows, sliced off after)."""
        return -(-self.out_features // 16) * 16

    def finish_load(self) -> None:
        if self.kernel == "int4pack":
            return
        if self.qweight.device.type == "cpu" and self.group_size in INT4_GROUP_SIZES and gemv_kernels_available():
            # plain layout: C++ GEMV for few rows (int8 or float activations, see the module docstring),
            # dequantize + float32 GEMM for many
            if self.decode_kernel not in INT4_DECODE_KERNELS:
                raise ValueError(f"Int4Linear.decode_kernel must be one of {INT4_DECODE_KERNELS}, "
                                 f"got {self.decode_kernel!r}")
            self.kernel = self.decode_kernel
            return
        if not self.kernel_supported(self.qweight.device):
            return
        self.set_kernel_tensors(_int4_kernel_layout(self.qweight, self.kernel_rows), self.scales, self.zeros)

    def set_kernel_tensors(self, kernel_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Run on torch's CPU kernel: codes already in its layout, scales and zeros (N, K/group) as saved."""
        pad = kernel_weight.shape[0] - self.out_features
        if pad:
            scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
        scales_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (G, N + pad, 2)
        self.qweight = self.scales = self.zeros = None  # registered buffers set to None: not in state_dict
        self.register_buffer("kernel_weight", kernel_weight, persistent=False)
        self.register_buffer("kernel_scales_zeros", scales_zeros, persistent=False)
        self.kernel = "int4pack"

    def plain(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight, scales, zeros) in the saved format, whatever layout the module runs on."""
        if self.kernel != "int4pack":
            return self.qweight, self.scales, self.zeros
        rows = self.kernel_weight.shape[0]  # out_features rounded up to the kernel's 16
        qweight = _int4_plain_from_kernel(self.kernel_weight, rows, self.in_features, self.group_size)
        scales, zeros = self.kernel_scales_zeros.transpose(0, 1).unbind(-1)
        n = self.out_features
        return qweight[:n].contiguous(), scales[:n].contiguous(), zeros[:n].contiguous()

    def to_plain(self) -> None:
        """Leave the kernel layout (e.g. to use the dequantize path)."""
        if self.kernel == "int4pack":
            qweight, scales, zeros = self.plain()
            del self.kernel_weight, self.kernel_scales_zeros
            self.qweight, self.scales, self.zeros = qweight, scales, zeros
        self.kernel = "dequant"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(*self.plain(), dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.kernel != "int4pack":
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        qweight, scales, zeros = self.plain()
        destination[prefix + "qweight"], destination[prefix + "scales"], destination[prefix + "zeros"] = (
            qweight, scales, zeros)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = _flat(x, self.in_features)
        if self.kernel in INT4_DECODE_KERNELS and x.device.type == "cpu" and x.dtype in KERNEL_FLOAT_DTYPES:
            if few_row_kernel_applies(x, self.qweight, x.shape[0]):
                op = torch.ops.fastllava.gemv_int4_q8 if self.kernel == "gemv_q8" else torch.ops.fastllava.gemv_int4
                out = op(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
                return out.reshape(*shape[:-1], self.out_features)
            # many rows (a prefill): measured 744 x 896 -> 4864, one thread: 93 ms through a float32 copy of the
            # weight and float32 GEMM, against 156 ms in torch's int4 kernel
            weight = dequantize_int4(self.qweight, self.scales, self.zeros, torch.float32)
            out = F.linear(x.float(), weight).to(x.dtype)
        elif self.kernel == "int4pack":
            if x.device.type != "cpu":
                raise RuntimeError("this int4 layer holds torch's CPU kernel layout; load the model with "
                                   "device_map=<device> instead of moving it after loading")
            if x.dtype not in KERNEL_FLOAT_DTYPES:
                raise TypeError(f"int4 CPU kernel takes bf16/fp16/fp32 activations, got {x.dtype}")
            scales_zeros = self.kernel_scales_zeros
            if scales_zeros.dtype != x.dtype:
                scales_zeros = scales_zeros.to(x.dtype)
            out = torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.kernel_weight, self.group_size, scales_zeros)
            if out.shape[-1] != self.out_features:
                out = out[:, :self.out_features]
        else:
            out = F.linear(x, dequantize_int4(self.qweight, self.scales, self.zeros, x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, {super().extra_repr()}")


class Int8Embedding(QuantizedModule):
    """Token embeddings stored as int8 rows with one scale per row; a lookup dequantizes only the rows it reads.
    ``pairs``: the codes are a tied int8 head's, in the pair layout (``use_pair_layout``); lookups gather the
    rows' blocks from it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, device: Any = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, device=device))
        self.kernel = "lookup"
        self.pairs = False

    def row_codes(self) -> torch.Tensor:
        """The codes row-major (a copy when they are in the pair layout)."""
        return _row_major(self.weight, self.pairs)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.row_codes().to(dtype) * self.scales.to(dtype)[:, None]

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.pairs:
            destination[prefix + "weight"] = self.row_codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if self.pairs:  # row-major codes over row-major codes, then back into pairs (the tied head's too)
            torch.ops.fastllava.int8_pairs_(self.weight, False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.pairs:
            torch.ops.fastllava.int8_pairs_(self.weight, True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pairs:
            codes = torch.ops.fastllava.int8_pair_rows(self.weight, ids)
        else:
            codes = F.embedding(ids, self.weight)
        return codes.to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def use_pair_layout(model: nn.Module) -> int:
    """Switch the Int8Linear layers on the ``gemv`` kernel to the pair layout where the CPU has AVX512-VNNI (the
    only loop that reads it fast). Codes another module also holds stay row-major, unless that module is the int8
    embedding of a tied head: it then reads them in the pair layout too. Returns how many layers switched."""
    if not gemv_kernels_available() or not torch.ops.fastllava.avx512_vnni_supported():
        return 0
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None and tensor.device.type == "cpu":
                holders.setdefault(tensor.data_ptr(), []).append(module)
    switched = 0
    for module in model.modules():
        if type(module) is not Int8Linear or not module.pair_layout_applies():
            continue
        others = [holder for holder in holders[module.weight.data_ptr()] if holder is not module]
        if all(type(other) is Int8Embedding and other.weight is module.weight and not other.pairs
               for other in others):
            module.to_pairs()
            for other in others:
                other.pairs = True
            switched += 1
    return switched


def use_row_layout(model: nn.Module) -> None:
    """Every int8 code back in row-major order (the inverse of ``use_pair_layout``)."""
    for module in model.modules():
        if type(module) is Int8Linear:
            module.to_rows()
        elif type(module) is Int8Embedding:
            module.pairs = False


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Switch every quantized layer to ``"dequant"`` or back to its packed CPU kernel (``"auto"``)."""
    if kernel not in ("auto", "dequant"):
        raise ValueError(f"kernel must be 'auto' or 'dequant', got {kernel!r}")
    use_row_layout(model)
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.to_plain()
            if kernel == "auto":
                module.finish_load()
        elif isinstance(module, Int8Linear):
            module.kernel = "dequant"
            if kernel == "auto":
                module.finish_load()
    if kernel == "auto":
        use_pair_layout(model)


def quantized_modules(model: nn.Module) -> dict[str, QuantizedModule]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedModule)}


# ----------------------------------------------------------------------------------------------------------
# Choosing the modules


def _short(name: str) -> str:
    return name.removeprefix("model.")


def _hub_name(name: str) -> str:
    from fastllava.weights import internal_to_hub

    return internal_to_hub(name + ".")[:-1]


def _group_of(name: str, module: nn.Module) -> str | None:
    short = _short(name)
    if type(module) is nn.Embedding:
        return "embed_tokens" if short == "language_model.embed_tokens" else None
    if type(module) not in (nn.Linear, Linear):  # other subclasses (e.g. MultiheadAttention's out_proj) are used by weight
        return None
    if name == "lm_head":
        return "lm_head"
    for group in ("language_model", "vision_tower", "multi_modal_projector"):
        if short.startswith(group + "."):
            return group
    return None


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        for candidate in (name, _hub_name(name)):
            if (candidate == pattern or candidate.startswith(pattern + ".") or candidate.endswith("." + pattern)
                    or fnmatch.fnmatchcase(candidate, pattern)):
                return True
    return False


def select_targets(model: nn.Module, qconfig: QuantizationConfig) -> dict[str, str]:
    """{module name: "int8" | "int4" | "int8_embedding"} for the modules the config asks to quantize."""
    candidates = {name: (module, _group_of(name, module)) for name, module in model.named_modules()}
    groups = [entry for entry in qconfig.modules if entry in GROUPS]
    patterns = [entry for entry in qconfig.modules if entry not in GROUPS]
    chosen: set[str] = set()
    for name, (module, group) in candidates.items():
        if group is not None and group in groups:
            chosen.add(name)
    for pattern in patterns:
        hits = [name for name, (module, group) in candidates.items()
                if type(module) in (nn.Linear, Linear, nn.Embedding) and group is not None
                and (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(_hub_name(name), pattern))]
        if not hits:
            raise QuantizationError(f"modules entry {pattern!r} matches no quantizable layer; the groups are "
                                    f"{list(GROUPS)}, patterns match names like 'model.language_model.layers.0.mlp.up_proj'")
        chosen.update(hits)
    chosen = {name for name in chosen if not _skipped(name, qconfig.skip_modules)}
    targets, left_out = {}, []
    for name in sorted(chosen):
        module = candidates[name][0]
        if isinstance(module, nn.Embedding):
            targets[name] = "int8_embedding"
        elif qconfig.weights == "int4" and (module.in_features % qconfig.group_size or module.in_features % 2):
            left_out.append(f"{name} (in_features {module.in_features})")
        else:
            targets[name] = qconfig.weights
    embed = next((n for n, (m, g) in candidates.items() if g == "embed_tokens"), None)
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" in candidates and embed is not None:
        # One tensor: the embedding is quantized exactly when the head is (else the tie would break).
        targets.pop(embed, None)
        if "lm_head" in targets:
            targets[embed] = "int8_embedding"
    if left_out:
        warnings.warn(f"int4 group_size {qconfig.group_size} does not divide the input width of {len(left_out)} "
                      f"layer(s), which stay in full precision: {', '.join(left_out[:5])}"
                      + (" ..." if len(left_out) > 5 else ""), stacklevel=3)
    return targets


def _build(kind: str, module: nn.Module, group_size: int | None) -> QuantizedModule:
    if kind == "int8_embedding":
        return Int8Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta")
    bias = module.bias is not None
    if kind == "int8":
        return Int8Linear(module.in_features, module.out_features, bias, device="meta")
    return Int4Linear(module.in_features, module.out_features, bias, group_size, device="meta")


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


# ----------------------------------------------------------------------------------------------------------
# Loading: the hook that from_pretrained / load_checkpoint call


class WeightQuantizer:
    """Swaps modules on the meta model and fills them as the loader hands over checkpoint tensors.

    Used by ``PreTrainedModel.load_checkpoint``: ``source_expectations`` says which tensors the checkpoint must
    provide (the float weights of the modules to quantize, in place of their quantized tensors), ``takes`` /
    ``load`` consume each of them (the loader then releases its file pages), ``finish`` runs after the loader
    tied the weights. With a checkpoint that fastllava saved quantized (``prequantized``) the codes load as
    they are; only int4 tensors are taken (copied out of the file map, since they are re-laid out for the kernel).
    """

    def __init__(self, qconfig: QuantizationConfig, targets: dict[str, str], prequantized: bool):
        self.qconfig, self.targets, self.prequantized = qconfig, targets, prequantized
        self.modules: dict[str, QuantizedModule] = {}
        self._sources: dict[str, list[str]] = {}  # tensor name -> the modules filled from it
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # saved int4 layers still missing a part

    @classmethod
    def for_load(cls, model: nn.Module, reader: Any, quantization_config: Any) -> "WeightQuantizer | None":
        """None when nothing is quantized; else a quantizer whose modules are already swapped in (on meta)."""
        saved = getattr(model.config, "quantization_config", None)
        if saved is None and quantization_config is None:
            return None
        if saved is None:
            qconfig = QuantizationConfig.coerce(quantization_config)
            quantizer = cls(qconfig, select_targets(model, qconfig), prequantized=False)
        else:
            if _foreign(saved):
                method = saved.get("quant_method") if isinstance(saved, Mapping) else type(saved).__name__
                raise QuantizationError(
                    f"this checkpoint is quantized with {method!r}, which fastllava cannot load; use the "
                    "full-precision checkpoint with quantization_config=fastllava.QuantizationConfig(...)")
            saved_config = QuantizationConfig.coerce(saved)
            if quantization_config is not None:
                wanted = QuantizationConfig.coerce(quantization_config)
                if (wanted.weights, wanted.group_size) != (saved_config.weights, saved_config.group_size):
                    described = saved_config.weights + ("" if saved_config.group_size is None
                                                        else f", group_size {saved_config.group_size}")
                    raise QuantizationError(
                        f"this checkpoint is already quantized ({described}) and cannot be re-quantized as "
                        f"{wanted.weights}: load it without quantization_config, or quantize the full-precision "
                        "checkpoint")
            quantizer = cls(saved_config, _targets_from_checkpoint(model, reader, saved_config), prequantized=True)
        quantizer._swap_in(model)
        return quantizer

    def _swap_in(self, model: nn.Module) -> None:
        if not self.targets:
            raise QuantizationError("quantization_config selects no layer of this model to quantize")
        for name, kind in self.targets.items():
            self.modules[name] = _build(kind, model.get_submodule(name), self.qconfig.group_size)
            _swap(model, name, self.modules[name])
        if self.prequantized:
            for name, module in self.modules.items():
                if isinstance(module, Int4Linear):  # re-laid out for the kernel: copy, release the file pages
                    for attr in ("qweight", "scales", "zeros"):
                        self._sources[f"{name}.{attr}"] = [name]
            return
        tied_head = getattr(model.config, "tie_word_embeddings", False) and "lm_head" in self.targets
        for name, kind in self.targets.items():
            source = name + ".weight"
            if tied_head and name == "lm_head":
                self._sources.setdefault(source, [])  # a tied checkpoint may still store it: a duplicate, dropped
                source = next(n for n, k in self.targets.items() if k == "int8_embedding") + ".weight"
            self._sources.setdefault(source, []).append(name)

    def source_expectations(self, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loader's {name: tensor} with each module to quantize expecting its float weight instead."""
        if self.prequantized:
            return expected
        out = {name: tensor for name, tensor in expected.items()
               if name.rpartition(".")[0] not in self.modules or name.endswith(".bias")}
        for name, module in self.modules.items():
            shape = ((module.num_embeddings, module.embedding_dim) if isinstance(module, Int8Embedding)
                     else (module.out_features, module.in_features))
            out[name + ".weight"] = torch.empty(shape, device="meta")
        return out

    def takes(self, name: str) -> bool:
        return name in self._sources

    def load(self, name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        """Fill the modules built from one checkpoint tensor (a tied embedding feeds lm_head as well)."""
        if self.prequantized:
            self._load_int4_part(name, tensor, dtype, device)
            return
        int8: tuple[torch.Tensor, torch.Tensor] | None = None
        for module_name in self._sources[name]:
            module = self.modules[module_name]
            if isinstance(module, Int4Linear):
                if module.kernel_supported(device):  # straight into the kernel layout, chunk by chunk
                    module.set_kernel_tensors(*quantize_int4(tensor, module.group_size, dtype, module.kernel_rows))
                else:
                    qweight, scales, zeros = quantize_int4(tensor, module.group_size, dtype)
                    module.qweight, module.scales, module.zeros = (t.to(device) for t in (qweight, scales, zeros))
                continue
            if int8 is None:
                int8 = quantize_int8(tensor, dtype)
            module.weight = int8[0].to(device)
            # A tied head shares the codes (tie_weights) but not the scales: safetensors refuses shared storage.
            module.scales = int8[1].to(device, copy=module_name == "lm_head")

    def _load_int4_part(self, name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        """qweight / scales / zeros of a saved int4 layer; the codes go into the kernel layout as they are read
        from the file map (no plain copy), the layer switches over once all three are in."""
        module_name, _, attr = name.rpartition(".")
        module = self.modules[module_name]
        parts = self._pending.setdefault(module_name, {})
        if attr == "qweight" and module.kernel_supported(device):
            parts["kernel_weight"] = _int4_kernel_layout(tensor, module.kernel_rows)
        else:
            parts[attr] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).to(device, copy=True)
        if len(parts) == 3:
            del self._pending[module_name]
            if "kernel_weight" in parts:
                module.set_kernel_tensors(parts["kernel_weight"], parts["scales"], parts["zeros"])
            else:
                module.qweight, module.scales, module.zeros = parts["qweight"], parts["scales"], parts["zeros"]

    def finish(self, model: nn.Module) -> None:
        """After tie_weights: drop what the tie put on an int4 head, check nothing is left on meta, pick kernels."""
        for name, module in self.modules.items():
            if isinstance(module, Int4Linear):
                module.__dict__.pop("weight", None)  # tie_weights aimed the head at the embedding's int8 codes
            for key, tensor in module._buffers.items():
                if tensor is not None and tensor.is_meta:
                    raise QuantizationError(f"{name}.{key} was not loaded: the checkpoint lacks it")
            module.finish_load()
        use_pair_layout(model)
        model.config.quantization_config = self.qconfig.to_dict()
        return_free_memory()


def return_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc keeps freed blocks between live ones resident):
    quantizing leaves many freed temporaries behind the long-lived codes. A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _foreign(saved: Any) -> bool:
    method = saved.get("quant_method", QUANT_METHOD) if isinstance(saved, Mapping) else getattr(saved, "quant_method", None)
    return method != QUANT_METHOD


def _targets_from_checkpoint(model: nn.Module, reader: Any, qconfig: QuantizationConfig) -> dict[str, str]:
    """Which modules a checkpoint saved by fastllava holds quantized, and how, from its keys and shapes."""
    from fastllava.weights import hub_to_internal

    keys = {hub_to_internal(key): key for key in reader.keys()}
    targets: dict[str, str] = {}
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, Linear, nn.Embedding) or name + ".scales" not in keys:
            continue
        if name + ".qweight" in keys:
            groups = reader.shape(keys[name + ".scales"])[-1]
            if qconfig.weights != "int4" or module.in_features != groups * qconfig.group_size:
                raise QuantizationError(
                    f"{keys[name + '.scales']} has {groups} groups for {module.in_features} inputs, which does not "
                    f"fit the checkpoint's quantization_config ({qconfig.weights}, group_size {qconfig.group_size})")
            targets[name] = "int4"
        elif isinstance(module, nn.Embedding):
            targets[name] = "int8_embedding"
        else:
            targets[name] = "int8"
    if not targets:
        raise QuantizationError(f"config.json of {reader.directory} declares a quantization_config but the "
                                "checkpoint holds no quantized tensors (a '.scales' key per quantized layer)")
    return targets
