"""fastllava's C++ GEMV kernels (fastllava/kernels/gemv.cpp) against float64 references: every weight format,
row counts on both sides of the register tiles, widths with tails, bias, leading dimensions, threads, the int4
kernel with int8-quantized activations (against a reference that rounds them the same way, and within the
rounding's bound of the unquantized product), the
shapes torch.compile sees, and clear errors. The build itself is required here (g++ and ninja are on every
machine this project runs CI on): a failed build fails these tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllava.kernels import build
from fastllava.quantization import dequantize_int4, quantize_int4, quantize_int8, unpack_nibbles


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert build.load(), "the C++ kernels did not build"
    return torch.ops.fastllava


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """float32 accumulation, then one rounding to the output dtype: within an ulp of that dtype (plus fp32 sums)."""
    assert got.dtype == dtype and got.shape == want.shape
    ulp = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 2 ** -20}[dtype]
    error = (got.double() - want).abs()
    assert bool((error <= want.abs() * ulp + 1e-4 * want.abs().max()).all()), error.max().item()


@pytest.fixture(params=["avx2", "avx512"])
def isa(request, kernels):
    """bf16 x bf16 products through the AVX2 loops and through the AVX512-BF16 ones (gemv_avx512.cpp). On a CPU
    without AVX512-BF16 the second variant checks that switching it on is refused (and runs the AVX2 loops)."""
    has_avx512_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    previous = kernels.set_avx512(request.param == "avx512")
    assert kernels.avx512_active() == (request.param == "avx512" and has_avx512_bf16)
    yield request.param
    kernels.set_avx512(previous)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 10, 13, 16, 31, 63])  # streamed rows, then 3x4 tiles + rests
@pytest.mark.parametrize("width", [8, 37, 64, 200])
def test_half_precision_weights(kernels, isa, weight_dtype, rows, width):
    torch.manual_seed(rows * 1000 + width)
    weight = torch.randn(67, width).to(weight_dtype)  # 67 outputs: no row count is special
    x = torch.randn(rows, width).to(weight_dtype)
    assert_close(kernels.gemv(x, weight), reference(x, weight), weight_dtype)


@pytest.mark.parametrize("width", [32, 96, 1000, 1056])  # whole 4 x 32 steps, masked 32-wide tails
def test_bf16_paths_agree_on_model_sized_products(kernels, width):
    """The AVX-512 and AVX2 loops differ only in float32 summation order: after the bf16 rounding, at most a
    bf16 ulp apart, and both within an ulp of the float64 product."""
    torch.manual_seed(width)
    weight = (torch.randn(300, width) * 0.05).to(torch.bfloat16)
    x = torch.randn(3, width).to(torch.bfloat16)
    previous = kernels.set_avx512(True)
    try:
        fast = kernels.gemv(x, weight)
        kernels.set_avx512(False)
        plain = kernels.gemv(x, weight)
    finally:
        kernels.set_avx512(previous)
    for out in (fast, plain):
        assert_close(out, reference(x, weight), torch.bfloat16)
    assert torch.allclose(fast.float(), plain.float(), rtol=2 ** -7, atol=1e-6)


def test_bias_leading_dimensions_and_float32_input(kernels, isa):
    torch.manual_seed(0)
    weight = torch.randn(40, 96, dtype=torch.bfloat16)
    bias = torch.randn(40, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    assert_close(kernels.gemv(x, weight, bias), reference(x, weight, bias), torch.bfloat16)
    strided = torch.randn(3, 192, dtype=torch.bfloat16)[:, ::2]  # not contiguous
    assert_close(kernels.gemv(strided, weight), reference(strided, weight), torch.bfloat16)
    x32 = torch.randn(2, 96)
    assert_close(kernels.gemv(x32, weight), reference(x32, weight), torch.float32)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 22])
def test_int8(kernels, rows):
    torch.manual_seed(rows)
    weight = torch.randn(53, 136) * 0.05
    codes, scales = quantize_int8(weight, torch.bfloat16)
    bias = torch.randn(53)
    x = torch.randn(rows, 136, dtype=torch.bfloat16)
    dequantized = codes.double() * scales.double()[:, None]
    assert_close(kernels.gemv_int8(x, codes, scales, bias), reference(x, dequantized, bias), torch.bfloat16)
    x32 = torch.randn(rows, 136)
    assert_close(kernels.gemv_int8(x32, codes, scales), reference(x32, dequantized), torch.float32)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 2, 3, 6])
@pytest.mark.parametrize("width", [512, 768])  # 768: 3 groups of 256, 12 blocks of 64
def test_int4(kernels, isa, group, rows, width):
    """Float activations (bf16 x takes the AVX512-BF16 loop where active: codes as bf16 128 + q, see
    gemv_avx512.cpp), against the float64 product of the dequantized weights."""
    torch.manual_seed(group + rows)
    weight = torch.randn(45, width) * 0.05
    weight[3] += 0.3  # a row whose zero point is far from its codes' centre (the -136 s + z offset matters)
    for scale_dtype in (torch.bfloat16, torch.float32):
        packed, scales, zeros = quantize_int4(weight, group, scale_dtype)
        dequantized = dequantize_int4(packed, scales, zeros, torch.float64)
        x = torch.randn(rows, width)
        got = kernels.gemv_int4(x, packed, scales, zeros, group)
        assert_close(got, reference(x, dequantized), torch.float32)
        bias = torch.randn(45)
        xb = x.bfloat16()
        assert_close(kernels.gemv_int4(xb, packed, scales, zeros, group, bias), reference(xb, dequantized, bias),
                     torch.bfloat16)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """gemv_int4_q8's activation rounding, in float32 as the kernel does it: per block of 32 columns
    d = max|x| / 127, q = round-half-even(x / d) (0 for an all-zero block); returns q * d in float64."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d == 0, torch.zeros_like(blocks), torch.round(blocks / torch.where(d == 0, 1, d)))
    assert bool((q.abs() <= 127).all())
    return (q.double() * d.double()).reshape(x.shape)


def int4_q8_reference(x, packed, scales, zeros, group, bias=None):
    """float64: sum_g scale_g * ((codes - 8) . quantized x)_g + zero_g * sum(x_g), the zeros' part from the
    unquantized x (as the kernel computes it); and a bound on its distance from the unquantized product:
    |x - q d| <= d / 2 per column, so |error| <= sum_k |scale_g(k) * (code_k - 8)| * d(k) / 2."""
    rows, width = x.shape
    n = packed.shape[0]
    codes = unpack_nibbles(packed).double().view(n, width // group, group) - 8
    s, z = scales.double(), zeros.double()
    xq = quantize_activations(x).view(rows, width // group, group)
    out = torch.einsum("mgk,ngk,ng->mn", xq, codes, s)
    out += torch.einsum("mg,ng->mn", x.double().view(rows, width // group, group).sum(-1), z)
    if bias is not None:
        out += bias.double()
    half_step = (x.float().reshape(rows, -1, 32).abs().amax(-1, keepdim=True).double() / 127 / 2)
    half_step = half_step.expand(rows, width // 32, 32).reshape(rows, width // group, group)
    bound = torch.einsum("mgk,ngk,ng->mn", half_step, codes.abs(), s.abs())
    return out, bound


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 16])  # 4-row passes, then 2, then 1
def test_int4_with_int8_activations(kernels, isa, group, rows):
    """The AVX2 loop and the AVX512-VNNI one (gemv_vnni.cpp, one int8 part) round x the same way: both exact
    against that rounding up to float32 sums. (Widths that are not a multiple of 128 take the AVX2 loop.)"""
    torch.manual_seed(group * 100 + rows)
    for width in sorted({group, 2 * group, 3 * group, 512, 1024 + group}):  # odd and even numbers of 32-blocks
        weight = torch.randn(37, width) * 0.05
        for scale_dtype in (torch.bfloat16, torch.float16, torch.float32):
            packed, scales, zeros = quantize_int4(weight, group, scale_dtype)
            dequantized = dequantize_int4(packed, scales, zeros, torch.float64)
            x = torch.randn(rows, width)
            x[0, :32] = 0  # an all-zero block
            x[-1, 32:64] *= 100  # a block with a large range
            bias = torch.randn(37)
            for xd in (x, x.bfloat16(), x.half()):
                got = kernels.gemv_int4_q8(xd, packed, scales, zeros, group, bias)
                want, bound = int4_q8_reference(xd, packed, scales, zeros, group, bias)
                assert_close(got, want, xd.dtype)  # the same activation rounding: exact up to float32 sums
                # against the unquantized product: within the activation rounding's bound (+ output rounding)
                exact = reference(xd, dequantized, bias)
                ulp = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 2 ** -20}[xd.dtype]
                slack = exact.abs() * ulp + 1e-4 * exact.abs().max()
                assert bool(((got.double() - exact).abs() <= bound + slack).all())
            # the activation rounding is small next to the int4 weights' own error
            float_kernel = kernels.gemv_int4(x, packed, scales, zeros, group, bias).double()
            int8_kernel = kernels.gemv_int4_q8(x, packed, scales, zeros, group, bias).double()
            assert ((int8_kernel - float_kernel).norm() / float_kernel.norm()).item() < 0.02


def test_int4_with_int8_activations_on_leading_dimensions_and_thread_counts(kernels, isa):
    torch.manual_seed(1)
    weight = torch.randn(4099, 256) * 0.05  # thousands of rows: both threads get work
    packed, scales, zeros = quantize_int4(weight, 64, torch.bfloat16)
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.gemv_int4_q8(x, packed, scales, zeros, 64)
        torch.set_num_threads(2)
        two = kernels.gemv_int4_q8(x, packed, scales, zeros, 64)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (2, 3, 4099) and torch.equal(one, two)
    want, _ = int4_q8_reference(x.reshape(6, 256), packed, scales, zeros, 64)
    assert_close(one.reshape(6, 4099), want, torch.bfloat16)


@pytest.fixture
def vnni(kernels):
    """The AVX512-VNNI integer loops (gemv_vnni.cpp): on by default where the CPU has them."""
    if not (kernels.avx512_vnni_supported() and kernels.avx512_active()):
        pytest.skip("the VNNI loops need a CPU with AVX512-VNNI and AVX512-BF16")


def two_part_step(x: torch.Tensor) -> torch.Tensor:
    """The VNNI loops' activation rounding (gemv_vnni.cpp): per block of 128 columns x ~= d (hi + lo / 256) with
    d = max|x| / 127, so each column is off by at most d / 256 (lo's rounding, d / 512, plus its clamp at 127).
    Returns that bound per column, float64."""
    blocks = x.float().reshape(x.shape[0], -1, 128).abs().amax(-1, keepdim=True).double() / 127 / 256
    return blocks.expand(x.shape[0], x.shape[1] // 128, 128).reshape(x.shape)


def vnni_inputs(rows: int, width: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(rows, width)
    x[0, :128] = 0  # an all-zero block
    x[-1, 128:256] *= 100  # a block with a large range (where the width has one)
    x[-1, 5] = 1e-4  # a tiny value beside ordinary ones
    return x


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9])  # 4-row passes, then 2, then 1
@pytest.mark.parametrize("width", [128, 384, 896])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_int8_vnni_loop(kernels, vnni, rows, width, scale_dtype):
    """bf16 x: int8 weights x two-part int8 activations, within the activation rounding's bound of the float64
    product (~128x tighter than one int8 part per block) and at most a bf16 ulp from the AVX2 float loop;
    float32 x stays on the exact float loop. 67 weight rows: one x row takes blocks of 16 rows and 3 rows after."""
    weight = torch.randn(67, width) * 0.05
    weight[3] *= 20  # a row with a large scale
    weight[50] *= 20  # and one in the last block of 16
    codes, scales = quantize_int8(weight, scale_dtype)
    dequantized = codes.double() * scales.double()[:, None]
    bias = torch.randn(67)
    x = vnni_inputs(rows, width, rows * 10 + width)
    for xd in (x, x.bfloat16()):
        got = kernels.gemv_int8(xd, codes, scales, bias)
        exact = reference(xd, dequantized, bias)
        bound = two_part_step(xd) @ dequantized.abs().T
        ulp = {torch.bfloat16: 2 ** -8, torch.float32: 2 ** -20}[xd.dtype]
        slack = exact.abs() * ulp + 1e-5 * exact.abs().max()
        assert bool(((got.double() - exact).abs() <= bound + slack).all())
        if xd.dtype == torch.float32:
            assert_close(got, exact, torch.float32)
        previous = kernels.set_avx512(False)
        try:
            plain = kernels.gemv_int8(xd, codes, scales, bias)
        finally:
            kernels.set_avx512(previous)
        assert_close(plain, exact, xd.dtype)
        if xd.dtype == torch.bfloat16:  # both one bf16 rounding of nearly the same float: at most an ulp apart
            assert torch.allclose(got.float(), plain.float(), rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("width", [256, 768])
def test_int4_vnni_two_part_loop(kernels, vnni, group, rows, width):
    """gemv_int4 (float activations) with bf16 x on the VNNI loop: two-part activations, so within their bound of
    the float64 product of the dequantized weights, for float32 and bf16 scales, and closer to it than gemv_int4_q8's
    one int8 part per 32 columns; float32 x keeps the exact float loop."""
    weight = torch.randn(45, width) * 0.05
    weight[3] += 0.3  # a zero point far from the codes' centre
    x = vnni_inputs(rows, width, group * 7 + rows + width).bfloat16()
    bias = torch.randn(45)
    for scale_dtype in (torch.bfloat16, torch.float32):
        packed, scales, zeros = quantize_int4(weight, group, scale_dtype)
        dequantized = dequantize_int4(packed, scales, zeros, torch.float64)
        codes = unpack_nibbles(packed).double().view(45, width // group, group) - 8
        centred = (codes * scales.double()[..., None]).reshape(45, width).abs()  # |(q - 8) s| per weight
        exact = F.linear(x.double(), dequantized, bias.double())
        got = kernels.gemv_int4(x, packed, scales, zeros, group, bias)
        slack = exact.abs() * 2 ** -8 + 1e-5 * exact.abs().max()  # the bf16 output's rounding
        assert bool(((got.double() - exact).abs() <= two_part_step(x) @ centred.T + slack).all())
        one_part = kernels.gemv_int4_q8(x, packed, scales, zeros, group, bias)
        assert (got.double() - exact).norm() < (one_part.double() - exact).norm()
        assert_close(kernels.gemv_int4(x.float(), packed, scales, zeros, group, bias), exact, torch.float32)


def test_vnni_loops_do_not_depend_on_the_thread_count(kernels, vnni):
    torch.manual_seed(3)
    codes, scales = quantize_int8(torch.randn(4099, 256) * 0.05, torch.bfloat16)
    packed, s4, z4 = quantize_int4(torch.randn(4099, 256) * 0.05, 64, torch.bfloat16)
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append((kernels.gemv_int8(x, codes, scales), kernels.gemv_int4_q8(x, packed, s4, z4, 64),
                            kernels.gemv_int4(x, packed, s4, z4, 64), kernels.gemv_int8(x[:1, :1], codes, scales),
                            kernels.gemv_int4_q8(x[:1, :1], packed, s4, z4, 64)))
    finally:
        torch.set_num_threads(threads)
    assert results[0][0].shape == (2, 3, 4099)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_results_do_not_depend_on_the_thread_count(kernels, isa):
    torch.manual_seed(0)
    weight = torch.randn(4096, 256, dtype=torch.bfloat16)
    for rows in (3, 16):  # streamed and tiled
        x = torch.randn(rows, 256, dtype=torch.bfloat16)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = kernels.gemv(x, weight)
            torch.set_num_threads(2)
            two = kernels.gemv(x, weight)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two)  # rows are split across threads, each output's sum is the same


def test_meta_tensors_give_output_shapes(kernels):
    x = torch.empty(2, 5, 64, device="meta", dtype=torch.bfloat16)
    assert kernels.gemv(x, torch.empty(48, 64, device="meta", dtype=torch.bfloat16)).shape == (2, 5, 48)
    codes = torch.empty(48, 32, device="meta", dtype=torch.uint8)
    scales = torch.empty(48, 1, device="meta")
    assert kernels.gemv_int4(x, codes, scales, scales, 64).shape == (2, 5, 48)
    assert kernels.gemv_int4_q8(x, codes, scales, scales, 64).shape == (2, 5, 48)


def test_bad_inputs_are_clear_errors(kernels):
    weight = torch.randn(16, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="input width 32 does not match the weight's 64"):
        kernels.gemv(torch.randn(1, 32, dtype=torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="weights must be bf16 or fp16"):
        kernels.gemv(torch.randn(1, 64), weight.float())
    with pytest.raises(RuntimeError, match="must be contiguous"):
        kernels.gemv(torch.randn(1, 64, dtype=torch.bfloat16), weight.t().contiguous().t())
    codes, scales = quantize_int8(torch.randn(16, 64), torch.float32)
    with pytest.raises(RuntimeError, match="15 scales for 16 rows"):
        kernels.gemv_int8(torch.randn(1, 64), codes, scales[:15])
    packed, s, z = quantize_int4(torch.randn(16, 64), 32, torch.float32)
    with pytest.raises(RuntimeError, match="group size 48 does not divide"):
        kernels.gemv_int4(torch.randn(1, 64), packed, s, z, 48)
    with pytest.raises(RuntimeError, match="group size 16 is not one of"):
        kernels.gemv_int4(torch.randn(1, 64), packed, s.repeat(1, 2), z.repeat(1, 2), 16)
    with pytest.raises(RuntimeError, match="gemv_int4_q8: group size 48 does not divide"):
        kernels.gemv_int4_q8(torch.randn(1, 64), packed, s, z, 48)
    with pytest.raises(RuntimeError, match="gemv_int4_q8: group size 16 is not one of"):
        kernels.gemv_int4_q8(torch.randn(1, 64), packed, s.repeat(1, 2), z.repeat(1, 2), 16)
    with pytest.raises(RuntimeError, match="input width 48 is not a multiple of 32"):
        kernels.gemv_int4_q8(torch.randn(1, 48), packed[:, :24].contiguous(), s[:, :1].contiguous(), z[:, :1].contiguous(), 16)
    with pytest.raises(RuntimeError, match="input width 32 does not match the weight's 64"):
        kernels.gemv_int4_q8(torch.randn(1, 32), packed, s, z, 32)
    with pytest.raises(RuntimeError, match="scales/zeros must be"):
        kernels.gemv_int4_q8(torch.randn(1, 64), packed, s[:15], z[:15], 32)
    with pytest.raises(RuntimeError, match="needs 2-D uint8 codes"):
        kernels.gemv_int4_q8(torch.randn(1, 64), packed.char(), s, z, 32)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setitem(build._state, "unused", True)
    monkeypatch.setenv("FASTLLAVA_KERNELS", "0")
    assert not build.kernels_enabled()
    monkeypatch.setenv("FASTLLAVA_KERNELS", "maybe")
    with pytest.raises(ValueError, match="FASTLLAVA_KERNELS='maybe'"):
        build.kernels_enabled()


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.delitem(build._state, "loaded")
    monkeypatch.setenv("FASTLLAVA_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_FLAGS", build._FLAGS + ["-fno-such-flag"])
    with pytest.warns(RuntimeWarning, match="C\\+\\+ kernels unavailable"):
        assert build.load() is False


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("shape", [(2, 128), (18, 256), (34, 896), (1030, 384)])  # tails of 2 and 6 after 16s
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_int8_pair_layout_gives_the_row_layouts_results_bit_for_bit(kernels, rows, shape, scale_dtype):
    """int8_pairs_ rearranges the codes in place and back; gemv_int8_pairs over them equals gemv_int8 over the rows
    exactly (the same arithmetic per row), on the VNNI loop, on the float loop (float32 x) and with AVX-512 off."""
    torch.manual_seed(rows * 31 + shape[0])
    codes = torch.randint(-127, 128, shape, dtype=torch.int8)
    scales, bias = torch.rand(shape[0]).to(scale_dtype) + 0.01, torch.randn(shape[0])
    paired = codes.clone()
    kernels.int8_pairs_(paired, True)
    n, k = shape  # row 2p's block b sits at pair p, slot 2b; row 2p + 1's at slot 2b + 1
    blocks = paired.view(n // 2, k // 128, 2, 128)
    assert torch.equal(blocks[:, :, 0].reshape(n // 2, k), codes[0::2])
    assert torch.equal(blocks[:, :, 1].reshape(n // 2, k), codes[1::2])
    back = paired.clone()
    kernels.int8_pairs_(back, False)
    assert torch.equal(back, codes)
    for x in (torch.randn(rows, k).bfloat16(), torch.randn(rows, k)):
        assert torch.equal(kernels.gemv_int8_pairs(x, paired, scales, bias), kernels.gemv_int8(x, codes, scales, bias))
        previous = kernels.set_avx512(False)
        try:
            assert torch.equal(kernels.gemv_int8_pairs(x, paired, scales), kernels.gemv_int8(x, codes, scales))
        finally:
            kernels.set_avx512(previous)


def test_int8_pair_rows_looks_rows_up_in_the_pair_layout(kernels):
    codes = torch.randint(-127, 128, (10, 384), dtype=torch.int8)
    paired = codes.clone()
    kernels.int8_pairs_(paired, True)
    ids = torch.tensor([[0, 9, 3], [4, 4, 7]])
    assert torch.equal(kernels.int8_pair_rows(paired, ids), codes[ids])
    assert torch.equal(kernels.int8_pair_rows(paired, torch.tensor(5)), codes[5])
    with pytest.raises(RuntimeError, match="index 10 is out of range for 10 rows"):
        kernels.int8_pair_rows(paired, torch.tensor([1, 10]))
    with pytest.raises(RuntimeError, match="ids must be int64"):
        kernels.int8_pair_rows(paired, torch.tensor([1], dtype=torch.int32))


def test_int8_pair_layout_refuses_what_it_cannot_hold(kernels):
    with pytest.raises(RuntimeError, match="even number of rows"):
        kernels.int8_pairs_(torch.zeros(3, 128, dtype=torch.int8), True)
    with pytest.raises(RuntimeError, match="multiple of 128 columns"):
        kernels.int8_pairs_(torch.zeros(4, 96, dtype=torch.int8), True)
    with pytest.raises(RuntimeError, match="contiguous 2-D int8"):
        kernels.int8_pairs_(torch.zeros(4, 128), True)
    with pytest.raises(RuntimeError, match="pair-layout weight"):
        kernels.gemv_int8_pairs(torch.randn(1, 128), torch.zeros(3, 128, dtype=torch.int8), torch.ones(3))
