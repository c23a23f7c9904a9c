// Few-row matrix products that stream their weights once: y (M, N) = x (M, K) @ W^T (+ bias) for bf16, fp16,
// int8 and int4 weights, M small (decode: one row per sequence).
//
// Why: on x86 CPUs without bf16 arithmetic (AVX2 only) PyTorch's bf16 GEMV runs at ~half the memory read
// bandwidth for one row and collapses for a few rows (measured on an AVX2 EPYC, one thread, 4864x896 weight:
// 9 GB/s at M=1, 3.3 GB/s at M=3, 1.2 GB/s at M=8). Here each weight row is read front to back as one stream
// with a software prefetch 1 KiB ahead, converted 8 values per instruction pair and multiplied against up to 4
// x rows while in registers: 12-16 GB/s on a 272 MB weight (a plain sum reads 18.6 GB/s on that core) and
// 2.7x torch at M=3, 3x at M=8. Interleaving four rows was slower (9.3 GB/s): one stream suits the prefetcher.
//
// Layouts (row-major, contiguous):
//   bf16 / fp16: W (N, K).
//   int8: W (N, K) int8, scales (N,) float: w = q * scale.
//   int4: W (N, K/2) uint8, two codes a byte, low nibble = even column; scales, zeros (N, K/group) float:
//         w = (q - 8) * scale + zero. (fastllava's saved int4 format, used as it is.) gemv_int4_q8 takes the
//         same tensors and rounds x to int8 per 32 columns for integer dot products (see there).
// x is converted to float32 once, accumulation is float32, the output has x's dtype (rounded once, as torch's
// kernels do). Rows are split across torch's intra-op threads. Built with -mavx2 -mfma -mf16c; the Python side
// loads it only on CPUs with AVX2 (torch's AVX2 level implies FMA and F16C).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include "decode_ops.h"
#include "gemv_avx512.h"
#include "vector_math.h"

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

namespace {

constexpr int64_t kPrefetchBytes = 1024;

using fastllava::horizontal_sum;

// Weight element types: how to load 8 of them as floats, and one (for a tail of K % 8 columns).
struct Bf16Weights {
  using Element = at::BFloat16;
  using V = fastllava::Vec<at::BFloat16>;
  const at::BFloat16* data;
  int64_t K;
  inline __m256 load(int64_t row, int64_t k) const { return V::load(data + row * K + k); }
  inline float at(int64_t row, int64_t k) const { return V::load1(data + row * K + k); }
  inline const char* address(int64_t row, int64_t k) const { return reinterpret_cast<const char*>(data + row * K + k); }
};

struct Fp16Weights {
  using Element = at::Half;
  using V = fastllava::Vec<at::Half>;
  const at::Half* data;
  int64_t K;
  inline __m256 load(int64_t row, int64_t k) const { return V::load(data + row * K + k); }
  inline float at(int64_t row, int64_t k) const { return V::load1(data + row * K + k); }
  inline const char* address(int64_t row, int64_t k) const { return reinterpret_cast<const char*>(data + row * K + k); }
};

struct Int8Weights {
  using Element = int8_t;
  const int8_t* data;
  int64_t K;
  inline __m256 load(int64_t row, int64_t k) const {
    __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(data + row * K + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  }
  inline float at(int64_t row, int64_t k) const { return static_cast<float>(data[row * K + k]); }
  inline const char* address(int64_t row, int64_t k) const { return reinterpret_cast<const char*>(data + row * K + k); }
};

// Weight row `row` times x rows [m, m + MR): U independent accumulators per x row hide the FMA latency.
template <int MR, int U, typename Weights>
inline void dot_row(const Weights& w, const float* x, int64_t K, int64_t row, int64_t m, float* out, int64_t N) {
  __m256 acc[MR][U];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
  constexpr int64_t step = 8 * U;
  int64_t k = 0;
  for (; k + step <= K; k += step) {
    _mm_prefetch(w.address(row, k) + kPrefetchBytes, _MM_HINT_T0);
    __m256 wv[U];
    for (int u = 0; u < U; ++u) wv[u] = w.load(row, k + 8 * u);
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < U; ++u)
        acc[i][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + (m + i) * K + k + 8 * u), acc[i][u]);
  }
  for (; k + 8 <= K; k += 8) {
    __m256 wv = w.load(row, k);
    for (int i = 0; i < MR; ++i) acc[i][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (m + i) * K + k), acc[i][0]);
  }
  for (int i = 0; i < MR; ++i) {
    __m256 a = acc[i][0];
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[i][u]);
    float sum = horizontal_sum(a);
    for (int64_t t = k; t < K; ++t) sum += w.at(row, t) * x[(m + i) * K + t];
    out[(m + i) * N + row] = sum;
  }
}

// Rows of work split across threads in runs of >= 64 KiB of weights.
inline int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, row_bytes)); }

// x rows 4 at a time (8 accumulators), then 2, then 1.
template <typename Weights>
void stream_rows(const Weights& w, const float* x, int64_t M, int64_t N, int64_t K, float* out) {
  at::parallel_for(0, N, grain_rows(K * sizeof(typename Weights::Element)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) dot_row<4, 2>(w, x, K, row, m, out, N);
      for (; m + 2 <= M; m += 2) dot_row<2, 4>(w, x, K, row, m, out, N);
      for (; m < M; ++m) dot_row<1, 4>(w, x, K, row, m, out, N);
    }
  });
}

// A register tile for more x rows (a batch of decode sequences): MR x rows held in registers meet NR weight
// rows, MR * NR accumulators (3 x 4: 12 accumulators + 3 x + 1 weight register = the 16 AVX2 registers), so
// every loaded weight vector feeds MR FMAs and every x vector NR: 12 FMAs per 7 loads, against 4 per 5 in
// dot_row<4>. The NR weight rows (a few KiB) stay in L1 while the x row blocks pass over them.
template <int MR, int NR, typename Weights>
inline void dot_tile(const Weights& w, const float* x, int64_t K, int64_t n0, int64_t m0, float* out, int64_t N) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + (m0 + i) * K + k);
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = w.load(n0 + j, k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float sum = horizontal_sum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) sum += w.at(n0 + j, t) * x[(m0 + i) * K + t];
      out[(m0 + i) * N + n0 + j] = sum;
    }
}

// All x rows against NR weight rows: blocks of 3 rows, with a remainder of 1 taken as 2 + 2 (a lone row
// would waste the tile), then 2, then 1.
template <int NR, typename Weights>
inline void tile_column(const Weights& w, const float* x, int64_t M, int64_t K, int64_t n0, float* out, int64_t N) {
  int64_t threes = M / 3;
  if (M % 3 == 1 && threes > 0) --threes;
  int64_t m = 0;
  for (; m < 3 * threes; m += 3) dot_tile<3, NR>(w, x, K, n0, m, out, N);
  for (; m + 2 <= M; m += 2) dot_tile<2, NR>(w, x, K, n0, m, out, N);
  for (; m < M; ++m) dot_tile<1, NR>(w, x, K, n0, m, out, N);
}

template <typename Weights>
void tile_rows(const Weights& w, const float* x, int64_t M, int64_t N, int64_t K, float* out) {
  constexpr int64_t NR = 4;
  const int64_t blocks = (N + NR - 1) / NR;
  const int64_t grain = std::max<int64_t>(1, grain_rows(K * sizeof(typename Weights::Element)) / NR);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * NR, rows = std::min(NR, N - n0);
      if (rows == 4) tile_column<4>(w, x, M, K, n0, out, N);
      else for (int64_t r = 0; r < rows; ++r) tile_column<1>(w, x, M, K, n0 + r, out, N);
    }
  });
}

// Few x rows: one streamed weight row at a time is bandwidth-bound and fastest; from kTileRows rows on the
// products are compute-bound and the register tile wins. Measured (one thread, 16 weights of 2816x1024 bf16,
// 92 MB, beyond the caches): streamed 12.6 / 12.1 / 9.3 / 7.6 GB/s at 1-4 rows against the tile's 7-8 (its 4
// concurrent row streams defeat the prefetcher; software prefetch made it worse), even at 6 rows, tile ahead
// from 8 (19.8 vs 23.8 ms). Cache-resident: the tile reaches ~60 GFLOP/s from 8 rows, 2x dot_row<4>.
constexpr int64_t kTileRows = 6;

template <typename Weights>
void dot_all_rows(const Weights& w, const float* x, int64_t M, int64_t N, int64_t K, float* out) {
  if (M >= kTileRows) tile_rows(w, x, M, N, K, out);
  else stream_rows(w, x, M, N, K, out);
}

void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "fastllava gemv: ", what, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), "fastllava gemv: ", what, " must be contiguous");
}

// x as (M, K) float32 rows: converted here, not by a dispatched .to() (decode calls this ~100 times a token).
at::Tensor float_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu(), "fastllava gemv: the input must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "fastllava gemv: input width ", x.size(-1),
              " does not match the weight's ", K);
  const at::ScalarType dtype = x.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return x.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  at::Tensor out = at::empty(rows.sizes(), rows.options().dtype(at::kFloat));
  const int64_t count = rows.numel();
  float* dst = out.data_ptr<float>();
  auto convert = [&](auto tag) {
    using V = fastllava::Vec<decltype(tag)>;
    const auto* src = reinterpret_cast<const decltype(tag)*>(rows.data_ptr());
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, V::load(src + i));
    for (; i < count; ++i) dst[i] = V::load1(src + i);
  };
  if (dtype == at::kBFloat16) convert(at::BFloat16{});
  else convert(at::Half{});
  return out;
}

// (M, N) float32 -> x's leading shape with N columns in x's dtype, + bias: one pass (the sum rounded once).
at::Tensor finish(const at::Tensor& out, const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "fastllava gemv: bias has ", bias->numel(), " values for ", N, " outputs");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const at::ScalarType dtype = x.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    if (bias_f.defined()) out.add_(bias_f.reshape({1, N}));
    return out.view(sizes).to(dtype);
  }
  at::Tensor result = at::empty(sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t M = out.size(0);
  const float* src = out.data_ptr<float>();
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto convert = [&](auto tag) {
    using T = decltype(tag);
    using V = fastllava::Vec<T>;
    T* dst = reinterpret_cast<T*>(result.data_ptr());
    for (int64_t m = 0; m < M; ++m) {
      const float* row = src + m * N;
      T* target = dst + m * N;
      int64_t n = 0;
      for (; n + 8 <= N; n += 8) {
        __m256 v = _mm256_loadu_ps(row + n);
        if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + n));
        V::store(target + n, v);
      }
      for (; n < N; ++n) target[n] = static_cast<T>(b ? row[n] + b[n] : row[n]);
    }
  };
  if (dtype == at::kBFloat16) convert(at::BFloat16{});
  else convert(at::Half{});
  return result;
}

// Whether bf16 x bf16 products take gemv_avx512.cpp's VDPBF16PS loops (default: when the CPU has them);
// set_avx512 switches it for tests and benchmarks and returns the previous setting.
std::atomic<bool> use_avx512{fastllava::avx512_bf16_supported()};

bool set_avx512(bool enabled) {
  return use_avx512.exchange(enabled && fastllava::avx512_bf16_supported());
}

bool avx512_active() { return use_avx512.load(); }

}  // namespace

bool fastllava::avx512_enabled() { return use_avx512.load(); }

namespace {

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2, "fastllava gemv: the weight must be 2-D");
  const int64_t N = weight.size(0), K = weight.size(1);
  if (weight.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 && use_avx512.load()) {
    TORCH_CHECK(x.device().is_cpu(), "fastllava gemv: the input must be on the CPU");
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "fastllava gemv: input width ", x.size(-1),
                " does not match the weight's ", K);
    const at::Tensor rows = x.reshape({-1, K}).contiguous();
    at::Tensor out = at::empty({rows.size(0), N}, rows.options().dtype(at::kFloat));
    fastllava::gemv_bf16_avx512(weight.data_ptr<at::BFloat16>(), rows.data_ptr<at::BFloat16>(), rows.size(0), N, K,
                                out.data_ptr<float>());
    return finish(out, x, N, bias);
  }
  at::Tensor xf = float_rows(x, K);
  const int64_t M = xf.size(0);
  at::Tensor out = at::empty({M, N}, xf.options());
  if (weight.scalar_type() == at::kBFloat16) {
    dot_all_rows(Bf16Weights{weight.data_ptr<at::BFloat16>(), K}, xf.data_ptr<float>(), M, N, K, out.data_ptr<float>());
  } else if (weight.scalar_type() == at::kHalf) {
    dot_all_rows(Fp16Weights{weight.data_ptr<at::Half>(), K}, xf.data_ptr<float>(), M, N, K, out.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "fastllava gemv: weights must be bf16 or fp16, got ", weight.scalar_type());
  }
  return finish(out, x, N, bias);
}

// pairs: the weight is in int8_pairs.cpp's pair layout. Only the VNNI loop reads it; the others get a row-major copy
// (a CPU without AVX512-VNNI never stores the layout, see quantization.Int8Linear: this is for tests and
// set_avx512(False)).
at::Tensor gemv_int8_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                          const std::optional<at::Tensor>& bias, bool pairs) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2, "gemv_int8 needs a 2-D int8 weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(scales.numel() == N, "gemv_int8: ", scales.numel(), " scales for ", N, " rows");
  at::Tensor xf = float_rows(x, K);
  const int64_t M = xf.size(0);
  at::Tensor out = at::empty({M, N}, xf.options());
  // bf16/fp16 x: the VNNI loop's two-part rounding is below x's own; float32 x keeps the exact float loop
  const bool float_scales = scales.scalar_type() == at::kFloat;
  if (x.scalar_type() != at::kFloat && use_avx512.load() && fastllava::avx512_vnni_supported() && K % 128 == 0 &&
      (float_scales || scales.scalar_type() == at::kBFloat16) && scales.is_contiguous()) {
    fastllava::gemv_int8_vnni(weight.data_ptr<int8_t>(), scales.data_ptr(), float_scales, xf.data_ptr<float>(), M, N,
                              K, out.data_ptr<float>(), pairs);  // scaled in the kernel: no per-call dispatched ops
  } else {
    at::Tensor rows = weight;
    if (pairs) {
      rows = weight.clone();
      fastllava::int8_pairs_(rows, false);
    }
    dot_all_rows(Int8Weights{rows.data_ptr<int8_t>(), K}, xf.data_ptr<float>(), M, N, K, out.data_ptr<float>());
    out.mul_(scales.to(at::kFloat).reshape({1, N}));
  }
  return finish(out, x, N, bias);
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
  return gemv_int8_impl(x, weight, scales, bias, false);
}

at::Tensor gemv_int8_pairs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % 2 == 0 && weight.size(1) % 128 == 0,
              "gemv_int8_pairs: a pair-layout weight has an even number of rows and a multiple of 128 columns, got ",
              weight.sizes());
  return gemv_int8_impl(x, weight, scales, bias, true);
}

// int4: per 16 columns, 8 bytes hold columns 2j (low nibble) and 2j+1 (high); x is read in the matching order
// (the 8 even columns, then the 8 odd ones), so one widening load gives 8 + 8 codes.
inline void load_int4x16(const uint8_t* p, __m256& even, __m256& odd) {
  __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  even = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
  odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
}

// One weight row against MR x rows: sum over groups g of scale_g * (codes . x)_g + (zero_g - 8 scale_g) * sum(x_g),
// 32 columns (16 bytes of codes) per step. Scales and zeros are read in their stored dtype (no per-call copy).
template <int MR, int64_t group, typename Scale>
inline void int4_row(const uint8_t* codes, const Scale* scales, const Scale* zeros, const float* xo,
                     const float* group_sums, int64_t K, int64_t row, int64_t m, float* out, int64_t N) {
  const int64_t groups = K / group;
  const uint8_t* row_codes = codes + row * (K / 2);
  __m256 total[MR];
  float offset_part[MR];
  for (int i = 0; i < MR; ++i) total[i] = _mm256_setzero_ps(), offset_part[i] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[MR][4];  // one accumulator per 8 of the 32 columns: four independent FMA chains
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < 4; ++u) acc[i][u] = _mm256_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(row_codes + k / 2) + kPrefetchBytes, _MM_HINT_T0);
      __m256 w[4];
      load_int4x16(row_codes + k / 2, w[0], w[1]);
      load_int4x16(row_codes + k / 2 + 8, w[2], w[3]);
      for (int i = 0; i < MR; ++i) {
        const float* xr = xo + (m + i) * K + k;
        for (int u = 0; u < 4; ++u) acc[i][u] = _mm256_fmadd_ps(w[u], _mm256_loadu_ps(xr + 8 * u), acc[i][u]);
      }
    }
    const float scale = static_cast<float>(scales[row * groups + g]);
    const float offset = static_cast<float>(zeros[row * groups + g]) - 8.f * scale;
    const __m256 s = _mm256_set1_ps(scale);
    for (int i = 0; i < MR; ++i) {
      __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3]));
      total[i] = _mm256_fmadd_ps(sum, s, total[i]);
      offset_part[i] += offset * group_sums[(m + i) * groups + g];
    }
  }
  for (int i = 0; i < MR; ++i) out[(m + i) * N + row] = horizontal_sum(total[i]) + offset_part[i];
}

// Checks shared by the int4 ops; returns (N, K, groups).
std::array<int64_t, 3> check_int4(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                                  const at::Tensor& zeros, int64_t group) {
  check_cpu(qweight, "qweight");
  check_cpu(scales, "scales");
  check_cpu(zeros, "zeros");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2, op, " needs 2-D uint8 codes");
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
  TORCH_CHECK(group > 0 && K % group == 0, op, ": group size ", group, " does not divide the input width ", K);
  const int64_t groups = K / group;
  TORCH_CHECK(scales.numel() == N * groups && zeros.numel() == N * groups, op, ": scales/zeros must be (", N, ", ",
              groups, ")");
  TORCH_CHECK(scales.scalar_type() == zeros.scalar_type(), op, ": scales and zeros must share a dtype");
  return {N, K, groups};
}

// body(std::integral_constant<int64_t, G>{}) for the supported group sizes: a constant unrolls the inner loops.
template <typename Body>
void with_group_constant(const char* op, int64_t group, Body body) {
  switch (group) {
    case 32: body(std::integral_constant<int64_t, 32>{}); break;
    case 64: body(std::integral_constant<int64_t, 64>{}); break;
    case 128: body(std::integral_constant<int64_t, 128>{}); break;
    case 256: body(std::integral_constant<int64_t, 256>{}); break;
    default: TORCH_CHECK(false, op, ": group size ", group, " is not one of 32, 64, 128, 256");
  }
}

at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, int64_t group, const std::optional<at::Tensor>& bias) {
  const std::array<int64_t, 3> shape = check_int4("gemv_int4", qweight, scales, zeros, group);
  const int64_t N = shape[0], K = shape[1], groups = shape[2];
  const bool float_scales = scales.scalar_type() == at::kFloat;
  // bf16/fp16 x with VNNI: two int8 parts per 128 columns, below x's own rounding and faster than the bf16 loop
  // below (one thread, Zen 4, 896 x 4864 group 64: 0.12 vs 0.20 ms)
  if (x.scalar_type() != at::kFloat && use_avx512.load() && fastllava::avx512_vnni_supported() && K % 128 == 0 &&
      group <= 256 && (float_scales || scales.scalar_type() == at::kBFloat16)) {
    with_group_constant("gemv_int4", group, [](auto) {});
    at::Tensor xf = float_rows(x, K);
    at::Tensor out = at::empty({xf.size(0), N}, xf.options());
    fastllava::gemv_int4_vnni(qweight.data_ptr<uint8_t>(), scales.data_ptr(), zeros.data_ptr(), float_scales, group,
                              2, xf.data_ptr<float>(), xf.size(0), N, K, out.data_ptr<float>());
    return finish(out, x, N, bias);
  }
  if (x.scalar_type() == at::kBFloat16 && use_avx512.load() && K % 64 == 0 &&
      (float_scales || scales.scalar_type() == at::kBFloat16) && group <= 256) {
    TORCH_CHECK(x.device().is_cpu() && x.size(-1) == K, "gemv_int4: input width ", x.size(-1),
                " does not match the weight's ", K);
    with_group_constant("gemv_int4", group, [](auto) {});  // the same group sizes as the AVX2 loops
    const at::Tensor rows = x.reshape({-1, K}).contiguous();
    at::Tensor out = at::empty({rows.size(0), N}, rows.options().dtype(at::kFloat));
    fastllava::gemv_int4_bf16_avx512(qweight.data_ptr<uint8_t>(), scales.data_ptr(), zeros.data_ptr(), float_scales,
                                     group, rows.data_ptr<at::BFloat16>(), rows.size(0), N, K, out.data_ptr<float>());
    return finish(out, x, N, bias);
  }
  at::Tensor xf = float_rows(x, K);
  const int64_t M = xf.size(0);
  // x columns reordered per block of 16 (the 8 even ones, then the 8 odd ones: the codes' nibble order), and
  // x summed per group (for the zeros' part): plain loops, M * K is tiny.
  at::Tensor xo = at::empty({M, K}, xf.options());
  at::Tensor group_sums = at::zeros({M, groups}, xf.options());
  const float* xs = xf.data_ptr<float>();
  float* xr = xo.data_ptr<float>();
  float* gs = group_sums.data_ptr<float>();
  for (int64_t i = 0; i < M * K; i += 16)
    for (int j = 0; j < 8; ++j) xr[i + j] = xs[i + 2 * j], xr[i + 8 + j] = xs[i + 2 * j + 1];
  for (int64_t i = 0; i < M * K; ++i) gs[i / group] += xs[i];
  at::Tensor out = at::empty({M, N}, xf.options());
  const uint8_t* codes = qweight.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scales.scalar_type(), "gemv_int4", [&] {
    const scalar_t* sp = scales.data_ptr<scalar_t>();
    const scalar_t* zp = zeros.data_ptr<scalar_t>();
    auto all_rows = [&](auto group_constant) {
      constexpr int64_t G = decltype(group_constant)::value;
      at::parallel_for(0, N, grain_rows(K / 2), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          int64_t m = 0;
          for (; m + 2 <= M; m += 2) int4_row<2, G>(codes, sp, zp, xr, gs, K, row, m, op, N);
          for (; m < M; ++m) int4_row<1, G>(codes, sp, zp, xr, gs, K, row, m, op, N);
        }
      });
    };
    with_group_constant("gemv_int4", group, all_rows);
  });
  return finish(out, x, N, bias);
}

// int4 weights x int8 activations (the idea of llama.cpp's Q4_0 x Q8_0 dot product): each x row is quantized once
// per call to int8 in blocks of 32 columns (d = max|x| / 127, q = round-half-even(x / d) in float32, q = 0 for an
// all-zero block). Codes are read as stored, 32 bytes (two blocks, 64 weights) at a time: one shift and two masks
// give two vectors of 32 unsigned codes (0..15), the even columns of both blocks and the odd columns of both
// blocks, and x is stored per 64 columns in that order (block b's 16 even columns, block b+1's, then the two odd
// halves). _mm256_maddubs_epi16 (unsigned codes x signed q) on each, one 16-bit add (|4 * 15 * 127| < 32767: no
// saturation) and _mm256_madd_epi16 with ones leave 8 int32 sums, lanes 0-3 block b's and 4-7 block b+1's: one
// conversion and one FMA with (d_b x4, d_b+1 x4) per 64 weights and x row, ~10 instructions against the float
// kernel's ~28, and the unpacked codes feed up to 4 x rows. A width that is an odd number of blocks ends with
// one block alone (group 32 only). Per group, scale_g * ((codes - 8) . xq)_g + zero_g * sum(x_g): the -8 with
// the sum of the int8 x (so the activation rounding meets the centred weights), the zeros with the float x's sum
// as gemv_int4 has it.
constexpr int64_t kQ8Block = 32;

// x (M, K) float -> q (M, K) int8 in the layout above, d4 (M, 4 * K / 32): each block's d four times, and
// q_sums (M, K / group) += d * sum(q) of each block (zeroed by the caller).
inline void quantize_q8_rows(const float* x, int64_t M, int64_t K, int64_t group, int8_t* q, float* d4, float* q_sums) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const int64_t blocks = K / kQ8Block, paired = blocks & ~int64_t{1};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* src = x + m * K + b * kQ8Block;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int u = 0; u < 4; ++u) {
        v[u] = _mm256_loadu_ps(src + 8 * u);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[u]));
      }
      const float scale = fastllava::horizontal_max(amax) / 127.f;
      for (int u = 0; u < 4; ++u) d4[(m * blocks + b) * 4 + u] = scale;
      alignas(32) int32_t rounded[kQ8Block] = {};
      if (scale != 0.f) {
        const __m256 dv = _mm256_set1_ps(scale);
        for (int u = 0; u < 4; ++u)
          _mm256_store_si256(reinterpret_cast<__m256i*>(rounded + 8 * u),
                             _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(v[u], dv),
                                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
      }
      // a pair: [b even | b+1 even | b odd | b+1 odd] (16 each); a lone last block: [even | odd]
      int8_t* even = b < paired ? q + m * K + (b / 2) * 64 + 16 * (b & 1) : q + m * K + b * kQ8Block;
      int8_t* odd = b < paired ? even + 32 : even + 16;
      int32_t sum = 0;
      for (int j = 0; j < 16; ++j) {
        even[j] = static_cast<int8_t>(rounded[2 * j]), odd[j] = static_cast<int8_t>(rounded[2 * j + 1]);
        sum += rounded[2 * j] + rounded[2 * j + 1];
      }
      q_sums[m * (K / group) + b * kQ8Block / group] += static_cast<float>(sum) * scale;
    }
  }
}

// 32 bytes of codes (blocks b, b+1) -> their even-column codes and odd-column codes, 32 unsigned bytes each.
inline void unpack_int4x64(const uint8_t* p, __m256i& even, __m256i& odd) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low = _mm256_set1_epi8(15);
  even = _mm256_and_si256(bytes, low);
  odd = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
}

// 8 int32 partial dots of 64 codes with 64 int8 x values (in the layouts above), converted to float.
inline __m256 pair_dot(__m256i even, __m256i odd, const int8_t* xp) {
  const __m256i a = _mm256_maddubs_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp)));
  const __m256i b = _mm256_maddubs_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32)));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(a, b), _mm256_set1_epi16(1)));
}

// A lone block (16 bytes of codes): [even | odd] codes against [even | odd] x, 8 int32 partial dots as float.
inline __m256 block_dot(const uint8_t* p, const int8_t* xp) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(bytes), _mm_srli_epi16(bytes, 4), 1);
  const __m256i codes = _mm256_and_si256(both, _mm256_set1_epi8(15));
  const __m256i dot = _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp)));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)));
}

// One weight row against MR int8 x rows. One x row keeps two accumulators and two running totals (alternating)
// so that its FMA chains do not bound the speed; from two rows on the rows' chains interleave, and one each
// keeps the 4 x rows' values within the 16 registers (two each spilled: 4 rows ran at half speed).
// Groups of 64 and more hold whole pairs: per group, (sum of d-scaled pair dots) * scale_g. Groups of 32: a pair
// spans two groups, so its dots are scaled by (d_b s_g x4, d_b+1 s_g+1 x4).
template <int MR, int64_t group, typename Scale>
inline void int4_q8_row(const uint8_t* codes, const Scale* scales, const Scale* zeros, const int8_t* xq,
                        const float* xd4, const float* group_sums, const float* q_sums, int64_t K, int64_t row,
                        int64_t m, float* out, int64_t N) {
  const int64_t groups = K / group, blocks = K / kQ8Block, pairs = blocks / 2;
  const uint8_t* row_codes = codes + row * (K / 2);
  const Scale* row_scales = scales + row * groups;
  const Scale* row_zeros = zeros + row * groups;
  const int8_t* xr[MR];
  const float* dr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = xq + (m + i) * K, dr[i] = xd4 + (m + i) * blocks * 4;
  constexpr int C = MR == 1 ? 2 : 1;  // chains per x row
  __m256 total[MR][C];
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < C; ++c) total[i][c] = _mm256_setzero_ps();
  if constexpr (group >= 64) {
    constexpr int64_t per_group = group / 64;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 acc[MR][C];
      for (int i = 0; i < MR; ++i)
        for (int c = 0; c < C; ++c) acc[i][c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < per_group; ++j) {
        const int64_t p = g * per_group + j;
        _mm_prefetch(reinterpret_cast<const char*>(row_codes + p * 32) + kPrefetchBytes, _MM_HINT_T0);
        __m256i even, odd;
        unpack_int4x64(row_codes + p * 32, even, odd);
        for (int i = 0; i < MR; ++i)
          acc[i][j % C] = _mm256_fmadd_ps(pair_dot(even, odd, xr[i] + p * 64), _mm256_loadu_ps(dr[i] + p * 8), acc[i][j % C]);
      }
      const __m256 s = _mm256_set1_ps(static_cast<float>(row_scales[g]));
      for (int i = 0; i < MR; ++i) {
        const __m256 sum = C == 2 && per_group > 1 ? _mm256_add_ps(acc[i][0], acc[i][C - 1]) : acc[i][0];
        if (C == 2 && (g & 1)) total[i][C - 1] = _mm256_fmadd_ps(sum, s, total[i][C - 1]);
        else total[i][0] = _mm256_fmadd_ps(sum, s, total[i][0]);
      }
    }
  } else {
    static_assert(group == kQ8Block, "groups are 32 or a multiple of 64");
    auto one_pair = [&](int64_t p, int t) {
      _mm_prefetch(reinterpret_cast<const char*>(row_codes + p * 32) + kPrefetchBytes, _MM_HINT_T0);
      __m256i even, odd;
      unpack_int4x64(row_codes + p * 32, even, odd);
      const __m256 s = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(static_cast<float>(row_scales[2 * p]))),
                                            _mm_set1_ps(static_cast<float>(row_scales[2 * p + 1])), 1);
      for (int i = 0; i < MR; ++i)
        total[i][t] = _mm256_fmadd_ps(pair_dot(even, odd, xr[i] + p * 64), _mm256_mul_ps(_mm256_loadu_ps(dr[i] + p * 8), s),
                                      total[i][t]);
    };
    int64_t p = 0;
    for (; p + 2 <= pairs; p += 2) one_pair(p, 0), one_pair(p + 1, C - 1);
    if (p < pairs) one_pair(p, 0);
    if (blocks & 1) {  // the lone last block
      const int64_t b = blocks - 1;
      const __m256 s = _mm256_set1_ps(static_cast<float>(row_scales[b]));
      for (int i = 0; i < MR; ++i)
        total[i][C - 1] = _mm256_fmadd_ps(block_dot(row_codes + b * 16, xr[i] + b * kQ8Block),
                                          _mm256_mul_ps(_mm256_set1_ps(dr[i][b * 4]), s), total[i][C - 1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float offset_part = 0.f;
    const float* sums = group_sums + (m + i) * groups;
    const float* qs = q_sums + (m + i) * groups;
    for (int64_t g = 0; g < groups; ++g)
      offset_part += static_cast<float>(row_zeros[g]) * sums[g] - 8.f * static_cast<float>(row_scales[g]) * qs[g];
    const __m256 sum = C == 2 ? _mm256_add_ps(total[i][0], total[i][C - 1]) : total[i][0];
    out[(m + i) * N + row] = horizontal_sum(sum) + offset_part;
  }
}

at::Tensor gemv_int4_q8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t group, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.dim() != 2 || (2 * qweight.size(1)) % kQ8Block == 0, "gemv_int4_q8: the input width ",
              2 * qweight.size(-1), " is not a multiple of 32");
  const std::array<int64_t, 3> shape = check_int4("gemv_int4_q8", qweight, scales, zeros, group);
  const int64_t N = shape[0], K = shape[1], groups = shape[2];
  at::Tensor xf = float_rows(x, K);
  const int64_t M = xf.size(0);
  const bool float_scales = scales.scalar_type() == at::kFloat;
  if (use_avx512.load() && fastllava::avx512_vnni_supported() && K % 128 == 0 && group <= 256 &&
      (float_scales || scales.scalar_type() == at::kBFloat16)) {
    with_group_constant("gemv_int4_q8", group, [](auto) {});  // the same group sizes as the AVX2 loops
    at::Tensor out = at::empty({M, N}, xf.options());
    fastllava::gemv_int4_vnni(qweight.data_ptr<uint8_t>(), scales.data_ptr(), zeros.data_ptr(), float_scales, group,
                              1, xf.data_ptr<float>(), M, N, K, out.data_ptr<float>());
    return finish(out, x, N, bias);
  }
  at::Tensor xq = at::empty({M, K}, xf.options().dtype(at::kChar));
  at::Tensor xd = at::empty({M, 4 * (K / kQ8Block)}, xf.options());
  at::Tensor group_sums = at::zeros({M, groups}, xf.options());
  const float* xs = xf.data_ptr<float>();
  float* gs = group_sums.data_ptr<float>();
  for (int64_t i = 0; i < M * K; ++i) gs[i / group] += xs[i];  // as gemv_int4 sums them
  // sum(q d) per group, for the codes' -8: the codes' part then is (codes - 8) . (q d) with the same x on both
  // sides, so the activation rounding error is scale * ((codes - 8) . e), not scale * (codes . e) (codes in 0..15
  // are not centred: ~2.5x the logit difference from gemv_int4 on the test checkpoints); the zeros' part stays
  // zero_g * sum(x_g) from the float x.
  at::Tensor q_sums = at::zeros({M, groups}, xf.options());
  quantize_q8_rows(xs, M, K, group, xq.data_ptr<int8_t>(), xd.data_ptr<float>(), q_sums.data_ptr<float>());
  at::Tensor out = at::empty({M, N}, xf.options());
  const uint8_t* codes = qweight.data_ptr<uint8_t>();
  const int8_t* qp = xq.data_ptr<int8_t>();
  const float* dp = xd.data_ptr<float>();
  const float* qsp = q_sums.data_ptr<float>();
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scales.scalar_type(), "gemv_int4_q8", [&] {
    const scalar_t* sp = scales.data_ptr<scalar_t>();
    const scalar_t* zp = zeros.data_ptr<scalar_t>();
    auto all_rows = [&](auto group_constant) {
      constexpr int64_t G = decltype(group_constant)::value;
      at::parallel_for(0, N, grain_rows(K / 2), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          int64_t m = 0;
          for (; m + 4 <= M; m += 4) int4_q8_row<4, G>(codes, sp, zp, qp, dp, gs, qsp, K, row, m, op, N);
          for (; m + 2 <= M; m += 2) int4_q8_row<2, G>(codes, sp, zp, qp, dp, gs, qsp, K, row, m, op, N);
          for (; m < M; ++m) int4_q8_row<1, G>(codes, sp, zp, qp, dp, gs, qsp, K, row, m, op, N);
        }
      });
    };
    with_group_constant("gemv_int4_q8", group, all_rows);
  });
  return finish(out, x, N, bias);
}

// Output shapes for tracing (torch.compile's fake tensors, the meta device): x's leading shape, N columns.
at::Tensor meta_output(const at::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return at::empty(sizes, x.options());
}
at::Tensor gemv_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>&) {
  return meta_output(x, weight.size(0));
}
at::Tensor gemv_int8_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor&,
                          const std::optional<at::Tensor>&) {
  return meta_output(x, weight.size(0));
}
at::Tensor gemv_int4_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor&, const at::Tensor&,
                          int64_t, const std::optional<at::Tensor>&) {
  return meta_output(x, qweight.size(0));
}  // gemv_int4_q8 has the same signature and shape

}  // namespace

at::Tensor fastllava::gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return ::gemv(x, weight, bias);
}
at::Tensor fastllava::gemv_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                                const std::optional<at::Tensor>& bias) {
  return ::gemv_int8(x, weight, scales, bias);
}
at::Tensor fastllava::gemv_int8_pairs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                                      const std::optional<at::Tensor>& bias) {
  return ::gemv_int8_pairs(x, weight, scales, bias);
}
at::Tensor fastllava::gemv_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& zeros, int64_t group, const std::optional<at::Tensor>& bias) {
  return ::gemv_int4(x, qweight, scales, zeros, group, bias);
}
at::Tensor fastllava::gemv_int4_q8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const at::Tensor& zeros, int64_t group, const std::optional<at::Tensor>& bias) {
  return ::gemv_int4_q8(x, qweight, scales, zeros, group, bias);
}

TORCH_LIBRARY(fastllava, m) {
  m.def("set_avx512(bool enabled) -> bool", &set_avx512);
  m.def("avx512_active() -> bool", &avx512_active);
  m.def("avx512_vnni_supported() -> bool", &fastllava::avx512_vnni_supported);
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor weight, Tensor scales, Tensor? bias=None) -> Tensor");
  m.def("gemv_int8_pairs(Tensor x, Tensor weight, Tensor scales, Tensor? bias=None) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group, Tensor? bias=None) -> Tensor");
  m.def("gemv_int4_q8(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastllava, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int8_pairs", &gemv_int8_pairs);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("gemv_int4_q8", &gemv_int4_q8);
}

TORCH_LIBRARY_IMPL(fastllava, Meta, m) {
  m.impl("gemv", &gemv_meta);
  m.impl("gemv_int8", &gemv_int8_meta);
  m.impl("gemv_int8_pairs", &gemv_int8_meta);
  m.impl("gemv_int4", &gemv_int4_meta);
  m.impl("gemv_int4_q8", &gemv_int4_meta);
}
