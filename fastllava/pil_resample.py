"""Pillow-exact image resizing in torch: the same uint8 results as ``PIL.Image.resize``, on batches and any device.

Contract: ``resize(x, (height, width), resample)`` takes a tensor ``(..., H, W)`` whose values are integers in
[0, 255] (uint8, or a float dtype holding such integers) and returns a float32 tensor ``(..., height, width)``
(or the sub-window ``region`` of it) equal, pixel for pixel, to what Pillow's ``Image.resize`` returns for the
same 8-bit image: same filter supports and antialiasing, same 22-bit fixed-point coefficients, two separable passes with
the first pass's result rounded to uint8, and the same rounding and clipping. NEAREST follows
Pillow's affine nearest-neighbour path. Filters: NEAREST (0), LANCZOS (1), BILINEAR (2), BICUBIC (3), BOX (4),
HAMMING (5), with Pillow's numbering. The pass order follows the installed Pillow (13 runs the vertical pass first
when the height loses more than twice as many pixels as the width; 12.2-12.3 did so for images over 100 times
taller than wide).
``pillow_box`` finds, where one exists, the ``box`` for Pillow's own ``Image.resize`` that computes only a window
of a resize, exactly (the CPU image processor resizes only what a centre crop keeps).
``kernel_resize`` computes a window of the same resize on CPU with the C++ kernel
(``fastllava/kernels/resample.cpp``, Pillow's own integer arithmetic, fed with the coefficients computed here)
where ``kernel_available`` says it is built and handles the filter (all but NEAREST); ``pil_source`` hands it
Pillow's pixel memory without a copy.

How: each pass is a banded matrix product. Output positions are grouped in blocks; each block reads only its input
window, so the work stays near Pillow's own instead of a dense (out x in) product. Products run in float32 (fast on
every device); float32 is exact for the inputs and the coefficients (k / 2**22 with |k| < 2**23) but not for the
sums, so every result is checked against a rigorous error bound and the few that lie too close to a rounding edge
are recomputed exactly in int64. When float32 matmuls are allowed to lose precision (TF32 / bf16 settings) the
products run in float64 instead.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch

__all__ = ["NEAREST", "LANCZOS", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "resize", "pillow_box", "kernel_available",
           "kernel_resize", "pil_source"]

# Pillow's Image.Resampling numbering (stored as "resample" in preprocessor_config.json).
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images
_ONE = 1 << _PRECISION_BITS
_HALF = 1 << (_PRECISION_BITS - 1)


# --- filters, written with Pillow's operation order so the float64 weights are bit-identical --------------------


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _scalar(fn):
    # Filters built on sin/cos use the C library (via math) like Pillow, not numpy's own approximations.
    def vectorized(x: np.ndarray) -> np.ndarray:
        return np.array([fn(float(v)) for v in x.ravel()], dtype=np.float64).reshape(x.shape)

    return vectorized


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


_F32_054 = float(np.float32(0.54))  # Pillow writes 0.54f / 0.46f: float literals promoted to double
_F32_046 = float(np.float32(0.46))


def _hamming_scalar(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_F32_054 + _F32_046 * math.cos(x))


def _lanczos_scalar(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


_FILTERS = {
    BOX: (_box, 0.5),
    BILINEAR: (_bilinear, 1.0),
    HAMMING: (_scalar(_hamming_scalar), 1.0),
    BICUBIC: (_bicubic, 2.0),
    LANCZOS: (_scalar(_lanczos_scalar), 3.0),
}


@dataclass(frozen=True)
class _Coefficients:
    """Pillow's per-output taps for one axis: output o reads inputs [start[o], start[o] + count[o])."""

    start: np.ndarray  # (out,) int64
    count: np.ndarray  # (out,) int64
    kint: np.ndarray  # (out, ksize) int64 fixed-point coefficients, zero past count


@lru_cache(maxsize=512)
def _coefficients(in_size: int, out_size: int, resample: int) -> _Coefficients:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for a full axis (box = whole image)."""
    return _box_coefficients(in_size, 0.0, float(np.float32(in_size)), out_size, resample)


def _box_coefficients(in_size: int, in0: float, in1: float, out_size: int, resample: int) -> _Coefficients:
    """The same for the source interval [in0, in1) (float32 values, as Pillow's box) mapped onto out_size."""
    fn, filter_support = _FILTERS[resample]
    scale = float(np.float32(in1) - np.float32(in0)) / out_size  # C: (double)(in1 - in0), a float32 difference
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    out = np.arange(out_size, dtype=np.float64)
    center = float(np.float32(in0)) + (out + 0.5) * scale
    start = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C (int) cast truncates
    stop = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    count = stop - start
    taps = np.arange(ksize, dtype=np.int64)
    valid = taps[None, :] < count[:, None]  # (out, ksize)
    arg = ((taps[None, :] + start[:, None]).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    weights = np.where(valid, fn(np.where(valid, arg, 0.0)), 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(ksize):  # sequential sum, as Pillow's loop (numpy's pairwise sum rounds differently)
        total = total + weights[:, j]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * float(_ONE)
    kint = np.trunc(np.where(weights < 0, -0.5 + scaled, 0.5 + scaled)).astype(np.int64)
    kint[~valid] = 0
    return _Coefficients(start, count, kint)


# Filters whose coefficients are computed vectorized (cheap enough to check a box for every new image size).
_BOX_FILTERS = (BOX, BILINEAR, BICUBIC)


@lru_cache(maxsize=4096)
def pillow_box(in_size: int, out_size: int, resample: int, start: int, count: int) -> tuple | None:
    """A Pillow ``resize(box=...)`` interval along one axis that computes only part of a resize, exactly.

    Returns (in0, in1, first, n): resizing the source interval [in0, in1) to n outputs gives exactly outputs
    [first, first + n) of the full resize of ``in_size`` to ``out_size``, a window that contains the wanted
    [start, start + count). None when no such window is smaller than the full axis (then resize it all).

    Pillow centres output j's filter at in0 + (j + 0.5) * (in1 - in0) / n and clamps its taps to the image, not to
    the box, so the same pixels are read with the same weights provided the scale (in1 - in0) / n, a float32
    difference divided in double, equals in_size / out_size exactly: the window's edges are therefore put on
    output indices whose source positions first * in_size / out_size are dyadic (exact in float32), i.e. multiples
    of the odd part of the reduced denominator. The centres can still differ in their last bit, so Pillow's integer
    coefficients are recomputed for the box and compared: a returned box is exact by construction.
    """
    if resample not in _BOX_FILTERS or not (0 <= start and count >= 1 and start + count <= out_size):
        return None
    scale = Fraction(in_size, out_size)
    odd = scale.denominator // (scale.denominator & -scale.denominator)  # drop the factors of two
    first = start // odd * odd
    last = min(-(-(start + count) // odd) * odd, out_size)
    if (first, last) == (0, out_size):
        return None
    in0, in1 = first * scale, last * scale
    if any(float(np.float32(float(v))) != v for v in (in0, in1, in1 - in0)):
        return None  # not exact in float32 (huge sizes): Pillow's box could not express it
    n = last - first
    full = _coefficients(in_size, out_size, resample)
    box = _box_coefficients(in_size, float(in0), float(in1), n, resample)
    want_count = full.count[first:last]
    width = int(want_count.max())
    if (np.array_equal(box.start, full.start[first:last]) and np.array_equal(box.count, want_count)
            and box.kint.shape[1] >= width and np.array_equal(box.kint[:, :width], full.kint[first:last, :width])):
        return float(in0), float(in1), first, n
    return None


@lru_cache(maxsize=512)
def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's ImagingScaleAffine: source index floor(x0 + k * a) accumulated in double, one step at a time."""
    step = float(np.float32(in_size)) / out_size
    steps = np.full(out_size, step, dtype=np.float64)
    steps[0] = 0.0 + step * 0.5
    positions = np.cumsum(steps)  # sequential accumulation, like `xo += a[0]`
    return np.minimum(np.trunc(positions).astype(np.int64), in_size - 1)


# --- banded pass plans ----------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One pass restricted to outputs [o0, o1), on a source already sliced to the inputs those outputs read."""

    in_lo: int  # first input index used (absolute)
    in_hi: int  # one past the last input index used (absolute)
    blocks: list  # [(out_lo, out_hi, win_lo, win_hi)]: outputs of a block and their input window (relative)
    start: np.ndarray  # (n_out,) first tap of each output, relative to in_lo
    count: np.ndarray  # (n_out,) number of taps
    kint: np.ndarray  # (n_out, ksize) fixed-point coefficients
    margin32: float  # |float32 product - exact| stays below this for every output
    weights: dict = field(default_factory=dict)  # (dtype, device) -> per-block weight tensors


# Input window per block: wide enough for efficient matrix products, narrow enough to skip most zero weights.
_BLOCK_INPUTS = 192


@lru_cache(maxsize=512)
def _plan(in_size: int, out_size: int, resample: int, o0: int, o1: int) -> _Plan:
    coeffs = _coefficients(in_size, out_size, resample)
    start, count, kint = coeffs.start[o0:o1], coeffs.count[o0:o1], coeffs.kint[o0:o1]
    stop = start + count
    in_lo, in_hi = int(start.min()), int(stop.max())
    budget = max(_BLOCK_INPUTS, kint.shape[1])
    blocks, first, n_out = [], 0, o1 - o0
    while first < n_out:
        last = first + 1  # a block always holds at least one output
        while last < n_out and stop[last] - start[first] <= budget:
            last += 1
        blocks.append((first, last, int(start[first]) - in_lo, int(stop[last - 1]) - in_lo))
        first = last
    # Rigorous float32 error bound (Higham's gamma_n): at most ksize nonzero products of |x| <= 255, their sums in
    # any order, and the rounding of the result; doubled for safety.
    n = kint.shape[1] + 2
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    abs_sum = float(np.abs(kint).sum(axis=1).max()) / _ONE
    margin32 = 2 * (gamma * 255 * abs_sum + 2.0**-15)
    return _Plan(in_lo, in_hi, blocks, start - in_lo, count, kint, margin32)


def _block_weights(plan: _Plan, dtype: torch.dtype, device: torch.device) -> list:
    key = (dtype, str(device))
    if key not in plan.weights:
        tensors = []
        for out_lo, out_hi, win_lo, win_hi in plan.blocks:
            w = np.zeros((out_hi - out_lo, win_hi - win_lo), dtype=np.float64)
            for row in range(out_lo, out_hi):
                offset, n = int(plan.start[row]) - win_lo, int(plan.count[row])
                w[row - out_lo, offset : offset + n] = plan.kint[row, :n] / _ONE  # exact: |k| < 2**24
            tensors.append(torch.from_numpy(w).to(device=device, dtype=dtype))  # (block outputs, window)
        plan.weights[key] = tensors
    return plan.weights[key]


def _work_dtype(device: torch.device) -> torch.dtype:
    # The error bound assumes IEEE float32 products; under TF32/bf16 matmul settings use float64 instead.
    reduced = torch.get_float32_matmul_precision() != "highest"
    if device.type == "cuda":
        reduced = reduced or torch.backends.cuda.matmul.allow_tf32
    return torch.float64 if reduced else torch.float32


def _round_exact(values: torch.Tensor, source: torch.Tensor, plan: _Plan, dim: int) -> torch.Tensor:
    """Round a pass's products to Pillow's uint8 results, recomputing in int64 those near a rounding edge.

    values: (..., n_out) for dim=-1 or (..., n_out, cols) for dim=-2; source: the pass input with the same
    leading dims. Pillow returns clip(floor((sum + 2**21) >> 22)) = clip(floor(v + 0.5)) for the exact v.
    """
    rounded = torch.round(values)  # floor(v + 0.5) except at exact ties, which fall in the ambiguous band
    margin = plan.margin32 if values.dtype == torch.float32 else 1e-9
    ambiguous = (values - rounded).abs_() > (0.5 - margin)
    if bool(ambiguous.any()):
        where = ambiguous.nonzero().unbind(1)  # one index tensor per dimension
        outputs = where[dim]
        device = values.device
        kint = torch.from_numpy(plan.kint).to(device)[outputs]  # (n, ksize)
        taps = torch.from_numpy(plan.start).to(device)[outputs][:, None] + torch.arange(kint.shape[1], device=device)
        taps = taps.clamp_(max=source.shape[dim] - 1)  # past `count` the coefficient is zero anyway
        # flatten the leading dims so the gather reads only the taps, never whole rows: (n, ksize)
        if dim == -1:
            flat = source.reshape(-1, source.shape[-1])
            lead = _flat_index(where[:-1], source.shape[:-1], outputs)
            gathered = flat[lead[:, None], taps]
        else:
            flat = source.reshape(-1, source.shape[-2], source.shape[-1])
            lead = _flat_index(where[:-2], source.shape[:-2], outputs)
            gathered = flat[lead[:, None], taps, where[-1][:, None]]
        acc = (gathered.round().long() * kint).sum(dim=1) + _HALF
        rounded[where] = torch.div(acc, _ONE, rounding_mode="floor").to(rounded.dtype)
    return rounded.clamp_(0, 255)


def _flat_index(index: tuple, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """Row-major linear index over the leading dims (none -> all zeros, shaped like `like`)."""
    flat = torch.zeros_like(like)
    for i, size in zip(index, shape):
        flat = flat * size + i
    return flat


def _horizontal(source: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """(..., in_hi - in_lo) -> (..., n_out): right products with each block's (outputs, window) weights."""
    weights = _block_weights(plan, source.dtype, source.device)
    parts = [source[..., lo:hi] @ w.T for (_, _, lo, hi), w in zip(plan.blocks, weights)]
    values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return _round_exact(values, source, plan, -1)


def _vertical(source: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """(..., in_hi - in_lo, cols) -> (..., n_out, cols): left products keep rows leading, no transposes."""
    weights = _block_weights(plan, source.dtype, source.device)
    parts = [w @ source[..., lo:hi, :] for (_, _, lo, hi), w in zip(plan.blocks, weights)]
    values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)
    return _round_exact(values, source, plan, -2)


def _window(out_size: int, start: int | None, length: int | None) -> tuple[int, int]:
    if start is None:
        return 0, out_size
    return max(start, 0), min(start + length, out_size)


def resize(
    x: torch.Tensor,
    size: tuple[int, int],
    resample: int = BICUBIC,
    region: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Resize ``x`` (..., H, W) holding 8-bit values to ``size`` = (height, width) exactly as Pillow does.

    ``region`` = (top, left, height, width) computes only that window of the full output (clamped to it): a
    centre crop then costs only the pixels it keeps. Returns float32 (float64 under reduced matmul precision)
    holding the integer results.
    """
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"resize target must be at least 1x1, got {height}x{width}")
    in_h, in_w = x.shape[-2], x.shape[-1]
    top, bottom = _window(height, *(region[0::2] if region else (None, None)))
    left, right = _window(width, *(region[1::2] if region else (None, None)))
    dtype = _work_dtype(x.device)
    x = x.to(dtype, memory_format=torch.contiguous_format)  # the products want W (then H) contiguous
    resample = int(resample)
    if (in_h, in_w) == (height, width):  # Pillow returns a copy
        return x[..., top:bottom, left:right]
    if resample == NEAREST:
        rows = torch.from_numpy(_nearest_index(in_h, height)[top:bottom]).to(x.device)
        cols = torch.from_numpy(_nearest_index(in_w, width)[left:right]).to(x.device)
        return x.index_select(-2, rows).index_select(-1, cols)
    if resample not in _FILTERS:
        raise ValueError(f"unsupported resample filter {resample!r}; use 0-5 (PIL.Image.Resampling numbering)")
    vplan = _plan(in_h, height, resample, top, bottom) if in_h != height else None
    hplan = _plan(in_w, width, resample, left, right) if in_w != width else None
    if _vertical_first(in_h, in_w, height, width):
        cols = x[..., hplan.in_lo : hplan.in_hi] if hplan else x[..., left:right]  # columns the 2nd pass reads
        y = _vertical(cols[..., vplan.in_lo : vplan.in_hi, :], vplan) if vplan else cols[..., top:bottom, :]
        return _horizontal(y, hplan) if hplan else y
    rows = x[..., vplan.in_lo : vplan.in_hi, :] if vplan else x[..., top:bottom, :]  # rows the 2nd pass reads
    y = _horizontal(rows[..., hplan.in_lo : hplan.in_hi], hplan) if hplan else rows[..., left:right]
    return _vertical(y, vplan) if vplan else y


def _pillow_version() -> tuple[int, int]:
    import PIL

    major, minor = (int(part) for part in PIL.__version__.split(".")[:2])
    return major, minor


_PILLOW = _pillow_version()


def _vertical_first(in_h: int, in_w: int, height: int, width: int) -> bool:
    """Pillow's pass order, which changed across releases (it decides where the uint8 rounding happens)."""
    if _PILLOW >= (13, 0):
        # 13.0's ImagingResampleInner: vertical first when the height shrinks by more than twice what the width
        # shrinks, in whole-image pixels (the box plays no part); established on ~4000 random sizes and boxes.
        return height < in_h and in_h - height > 2 * (in_w - width)
    if _PILLOW >= (12, 2):  # Image.resize's special case for very tall images
        return in_h > in_w * 100 and height < in_h
    return False


# --- the C++ kernel (fastllava/kernels/resample.cpp): the same integers as Pillow, on CPU, for a window ----------

# Filters the kernel reproduces bit for bit (NEAREST is Pillow's affine path: Pillow itself is used for it).
KERNEL_FILTERS = (LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING)


def kernel_available(resample: int) -> bool:
    """True when ``torch.ops.fastllava.resample_window`` can compute this filter (builds the kernels if needed;
    False with FASTLLAVA_KERNELS=0, without a compiler or AVX2: then callers use Pillow)."""
    try:
        resample = int(resample)
    except (TypeError, ValueError):
        return False
    if resample not in KERNEL_FILTERS:
        return False
    from fastllava.kernels import build

    return build.load()


@lru_cache(maxsize=1024)
def _window_taps(in_size: int, out_size: int, resample: int, start: int, count: int) -> torch.Tensor | None:
    """Outputs [start, start + count) of one axis as the kernel reads them: int32 (count, 2 + ksize) rows of
    [first input, tap count, Pillow's fixed-point coefficients]; None when Pillow does not resample the axis."""
    if in_size == out_size:
        return None
    coeffs = _coefficients(in_size, out_size, resample)
    stop = start + count
    kint = coeffs.kint[start:stop]
    taps = np.empty((count, 2 + kint.shape[1]), dtype=np.int32)
    taps[:, 0] = coeffs.start[start:stop]
    taps[:, 1] = coeffs.count[start:stop]
    taps[:, 2:] = kint
    return torch.from_numpy(taps)


def kernel_resize(source: torch.Tensor, channels: int, size: tuple[int, int], resample: int,
                  rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None,
                  out: torch.Tensor | None = None, table: torch.Tensor | None = None, dy: int = 0,
                  dx: int = 0, parallel: bool = False) -> torch.Tensor:
    """Pillow's ``resize(size=(height, width))`` of ``source`` (H, W, P) uint8 (pixels P bytes apart, the first
    ``channels`` used, rows at any stride), only rows/cols (start, count) of the result, by the C++ kernel.

    Without ``table``: returns the window as uint8 (rows, cols, channels). With ``table`` (channels, 256) float32:
    writes table[c][value] into ``out`` (channels, OH, OW) float32 at [c, dy + y, dx + x] and returns ``out``.
    ``parallel``: split the rows across torch's intra-op threads (for an image alone; the image processor runs
    the images of a batch in threads of its own instead). Raises RuntimeError where ``kernel_available(resample)``
    is False.
    """
    if not kernel_available(resample):
        raise RuntimeError(f"the resample kernel is unavailable for filter {resample!r} (see kernel_available)")
    height, width = int(size[0]), int(size[1])
    in_h, in_w = int(source.shape[0]), int(source.shape[1])
    resample = int(resample)
    top, n_rows = rows if rows is not None else (0, height)
    left, n_cols = cols if cols is not None else (0, width)
    if not (0 <= top and n_rows >= 1 and top + n_rows <= height and 0 <= left and n_cols >= 1
            and left + n_cols <= width):
        raise ValueError(f"window rows={rows} cols={cols} outside the {height}x{width} resize")
    ytaps = _window_taps(in_h, height, resample, top, n_rows)
    xtaps = _window_taps(in_w, width, resample, left, n_cols)
    if out is None:
        out = torch.empty((n_rows, n_cols, channels), dtype=torch.uint8)
    torch.ops.fastllava.resample_window(source, channels, ytaps, top, n_rows, xtaps, left, n_cols,
                                        _vertical_first(in_h, in_w, height, width), out, table, dy, dx, parallel)
    return out


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64), ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))), ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p), ("private_data", ctypes.c_void_p),
]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_PIXEL_BYTES = {"RGB": (4, 3), "L": (1, 1)}  # Pillow's memory: RGB pixels are 4 bytes (RGBX), L pixels 1


def pil_source(image) -> tuple[torch.Tensor, int, object]:
    """An RGB or L PIL image as the kernel's (H, W, P) uint8 source, the number of channels, and an object to keep
    alive while the source is used. Pillow's own pixel memory is read in place through its Arrow export when the
    image is one block (no copy: ``np.asarray`` costs about a fifth of a resize); otherwise a numpy copy."""
    pixel, channels = _PIXEL_BYTES[image.mode]
    height, width = image.height, image.width
    try:
        image.load()
        _, capsule = image.__arrow_c_array__()
        array = _ArrowArray.from_address(_capsule_pointer(capsule, b"arrow_array"))
        data = array.children[0].contents if pixel > 1 else array
        if array.offset or data.offset or data.length != height * width * pixel:
            raise ValueError("unexpected Arrow layout")
        address = data.buffers[1]
        buffer = (ctypes.c_uint8 * (height * width * pixel)).from_address(address)
        source = torch.frombuffer(buffer, dtype=torch.uint8).view(height, width, pixel)
        return source, channels, (capsule, buffer, image)
    except Exception:  # noqa: BLE001 - no Arrow export (Pillow < 11.2), an image in several blocks, ...
        array = np.array(image)  # writable copy, (H, W) or (H, W, 3)
        return torch.from_numpy(array.reshape(height, width, -1)), channels, array
