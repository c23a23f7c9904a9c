// AVX-512 BF16 few-row products: y (M, N) = x (M, K) @ W^T for bf16 x and bf16 or int4 W, float32 results, on
// CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and newer). gemv.cpp calls these when the CPU has the instructions
// and they are switched on (``set_avx512``), else its AVX2 loops. int8 weights do not come here: the same
// nibble-to-bf16 trick as int4 ran at 0.77x of the AVX2 loop (12.5 vs 16.2 G weights/s interleaved on a loaded
// Zen 4; each zmm op is two 256-bit halves there, so only instructions that do more work per op pay); integer dot
// products do (gemv_vnni.cpp, which now also takes int4 with bf16 activations where the CPU has VNNI).
//
// Why: with AVX2 each 8 bf16 weights cost a widening load, a shift and an FMA; the AVX2 GEMV streamed a 311 MB
// weight at 21 GB/s on a core that reads 27.5 GB/s (measured, one thread, Zen 4 EPYC). VDPBF16PS multiplies 32
// bf16 pairs and adds them into 16 float32 lanes in one instruction straight from the stored bits, so the loop
// is one load and one instruction per 64 bytes of weights per x row and the stream runs at the read bandwidth.
// Products of two bf16 values are exact in float32; sums are float32 (in another order than the AVX2 loop, so
// results may differ in the last float32 bits before the one rounding to bf16). Denormal inputs count as zero
// (the instruction's DAZ), far below any bf16 activation or weight that matters.
//
// Compiled with a target pragma, not a global -mavx512 flag, so the library still loads on AVX2-only CPUs:
// only functions in this file's anonymous namespace use the instructions, and gemv.cpp reaches them after a
// runtime CPU check. Headers come before the pragma (their inline functions stay AVX2 code).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "gemv_avx512.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,bmi2")

namespace {

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

inline __m512i load_bf16x32(const uint16_t* p) { return _mm512_loadu_si512(p); }

inline __m512i load_bf16_tail(const uint16_t* p, int64_t count) {  // count < 32 values, the rest zero
  return _mm512_maskz_loadu_epi16(static_cast<__mmask32>(_bzhi_u32(0xffffffffu, static_cast<unsigned>(count))), p);
}

// One weight row streamed once against MR x rows (U weight vectors of 32 per step, MR * U accumulators). No
// software prefetch: the hardware prefetcher alone streamed a 311 MB weight at 24 GB/s, and a prefetch 1 KiB
// ahead every 64 or 128 bytes cut that to 19 and 12 GB/s (one thread, Zen 4).
template <int MR, int U>
inline void bf16_row(const uint16_t* w, const uint16_t* x, int64_t K, int64_t row, int64_t m, float* out, int64_t N) {
  __m512 acc[MR][U];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
  const uint16_t* wr = w + row * K;
  constexpr int64_t step = 32 * U;
  int64_t k = 0;
  for (; k + step <= K; k += step) {
    __m512i wv[U];
    for (int u = 0; u < U; ++u) wv[u] = load_bf16x32(wr + k + 32 * u);
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < U; ++u)
        acc[i][u] = _mm512_dpbf16_ps(acc[i][u], as_bh(wv[u]), as_bh(load_bf16x32(x + (m + i) * K + k + 32 * u)));
  }
  for (; k < K; k += 32) {
    const int64_t count = std::min<int64_t>(32, K - k);
    const __m512i wv = count == 32 ? load_bf16x32(wr + k) : load_bf16_tail(wr + k, count);
    for (int i = 0; i < MR; ++i) {
      const uint16_t* xp = x + (m + i) * K + k;
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], as_bh(wv), as_bh(count == 32 ? load_bf16x32(xp) : load_bf16_tail(xp, count)));
    }
  }
  for (int i = 0; i < MR; ++i) {
    __m512 sum = acc[i][0];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[i][u]);
    out[(m + i) * N + row] = _mm512_reduce_add_ps(sum);
  }
}

// A register tile for many x rows: MR x rows meet NR weight rows, MR * NR accumulators, each loaded weight
// vector feeds MR instructions and each x vector NR (4 x 4: 16 accumulators + 4 x + 1 weight of 32 registers).
template <int MR, int NR>
inline void bf16_tile(const uint16_t* w, const uint16_t* x, int64_t K, int64_t n0, int64_t m0, float* out, int64_t N) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t count = std::min<int64_t>(32, K - k);
    __m512i xv[MR];
    for (int i = 0; i < MR; ++i)
      xv[i] = count == 32 ? load_bf16x32(x + (m0 + i) * K + k) : load_bf16_tail(x + (m0 + i) * K + k, count);
    for (int j = 0; j < NR; ++j) {
      const uint16_t* wp = w + (n0 + j) * K + k;
      const __m512i wv = count == 32 ? load_bf16x32(wp) : load_bf16_tail(wp, count);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], as_bh(wv), as_bh(xv[i]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[(m0 + i) * N + n0 + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int NR>
inline void bf16_tile_column(const uint16_t* w, const uint16_t* x, int64_t M, int64_t K, int64_t n0, float* out,
                             int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) bf16_tile<4, NR>(w, x, K, n0, m, out, N);
  switch (M - m) {
    case 3: bf16_tile<3, NR>(w, x, K, n0, m, out, N); break;
    case 2: bf16_tile<2, NR>(w, x, K, n0, m, out, N); break;
    case 1: bf16_tile<1, NR>(w, x, K, n0, m, out, N); break;
    default: break;
  }
}

inline int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, row_bytes)); }

// From this many x rows the register tile beats streaming each weight row once per row block (as in gemv.cpp).
constexpr int64_t kTileRows = 6;

void bf16_all_rows(const uint16_t* w, const uint16_t* x, int64_t M, int64_t N, int64_t K, float* out) {
  if (M >= kTileRows) {
    constexpr int64_t NR = 4;
    const int64_t blocks = (N + NR - 1) / NR;
    at::parallel_for(0, blocks, std::max<int64_t>(1, grain_rows(2 * K) / NR), [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t n0 = block * NR, rows = std::min(NR, N - n0);
        if (rows == NR) bf16_tile_column<NR>(w, x, M, K, n0, out, N);
        else for (int64_t r = 0; r < rows; ++r) bf16_tile_column<1>(w, x, M, K, n0 + r, out, N);
      }
    });
    return;
  }
  at::parallel_for(0, N, grain_rows(2 * K), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      // x rows in pairs (the weight row stays in L1 for the next pair): 4 rows at once measured 10-15 GB/s
      // against 21-24 for 1-3 rows
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) bf16_row<2, 4>(w, x, K, row, m, out, N);
      for (; m < M; ++m) bf16_row<1, 4>(w, x, K, row, m, out, N);
    }
  });
}

// int4 codes as bf16: the word 0x4300 | q is the bf16 value 128 + q exactly (exponent 2^7, q in the low mantissa
// bits), so VDPBF16PS multiplies codes by bf16 x with no conversion: sum (128 + q) x = sum q x + 128 sum x, and per
// group g with w = (q - 8) s_g + z_g: sum_g w . x = s_g D_g + S_g (z_g - 136 s_g), where D_g is the bf16 dot and
// S_g the sum of x over the group. 32 bytes of codes (64 columns, fastllava's layout: byte j = column 2j in the
// low nibble, 2j + 1 in the high one) widen to 32 words; one logic op gives the even columns' bf16 values, a
// shift and an or the odd ones'; x is stored per 64 columns as [32 even | 32 odd] to match.
template <typename Scale>
inline float scale_value(const Scale* p, int64_t i) { return static_cast<float>(p[i]); }

inline void int4_words(const uint8_t* p, __m512i& even, __m512i& odd) {
  const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i bias = _mm512_set1_epi16(0x4300);
  even = _mm512_ternarylogic_epi32(words, _mm512_set1_epi16(0x000f), bias, 0xea);  // (words & 15) | bias
  odd = _mm512_or_si512(_mm512_srli_epi16(words, 4), bias);
}

// sum_g S_g (z_g - 136 s_g) over one weight row's groups, 16 groups per step.
template <typename Scale>
inline float int4_offsets(const Scale* scales, const Scale* zeros, const float* sums, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(std::min<int64_t>(16, groups - g))));
    __m512 s, z;
    if constexpr (std::is_same_v<Scale, float>) {
      s = _mm512_maskz_loadu_ps(mask, scales + g);
      z = _mm512_maskz_loadu_ps(mask, zeros + g);
    } else {  // bf16: the top half of a float
      s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, scales + g)), 16));
      z = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, zeros + g)), 16));
    }
    const __m512 term = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), s, z);  // z - 136 s
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, sums + g), term, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// One weight row against MR x rows (reordered bf16, see above). Each 64-column block's two dots start from zero
// and are scaled into one of two running totals (alternating): a chain of dependent VDPBF16PS (6 cycles each on
// Zen 4) would bound the loop, not the memory (one accumulator per group measured 7-15 G weights/s).
template <int MR, int64_t group, typename Scale>
inline void int4_row(const uint8_t* codes, const Scale* scales, const Scale* zeros, const uint16_t* xo,
                     const float* sums, int64_t K, int64_t row, int64_t m, float* out, int64_t N) {
  static_assert(group == 32 || group % 64 == 0, "groups are 32 or a multiple of 64");
  const int64_t groups = K / group, blocks = K / 64;
  const uint8_t* row_codes = codes + row * (K / 2);
  const Scale* row_scales = scales + row * groups;
  __m512 total[MR][2];
  for (int i = 0; i < MR; ++i) total[i][0] = total[i][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i even, odd;
    int4_words(row_codes + b * 32, even, odd);
    __m512 s;
    if constexpr (group == 32)  // lanes 0-7 of a block's dot belong to group 2b, lanes 8-15 to group 2b + 1
      s = _mm512_insertf32x8(_mm512_set1_ps(scale_value(row_scales, 2 * b)),
                             _mm256_set1_ps(scale_value(row_scales, 2 * b + 1)), 1);
    else
      s = _mm512_set1_ps(scale_value(row_scales, b / (group / 64)));
    for (int i = 0; i < MR; ++i) {
      const uint16_t* xp = xo + (m + i) * K + b * 64;
      const __m512 dot = _mm512_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(even), as_bh(load_bf16x32(xp))),
                                       _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(odd), as_bh(load_bf16x32(xp + 32))));
      total[i][b & 1] = _mm512_fmadd_ps(dot, s, total[i][b & 1]);
    }
  }
  for (int i = 0; i < MR; ++i)
    out[(m + i) * N + row] = _mm512_reduce_add_ps(_mm512_add_ps(total[i][0], total[i][1])) +
                             int4_offsets(row_scales, zeros + row * groups, sums + (m + i) * groups, groups);
}

template <int64_t group, typename Scale>
void int4_all_rows(const uint8_t* codes, const Scale* scales, const Scale* zeros, const uint16_t* xo,
                   const float* sums, int64_t M, int64_t N, int64_t K, float* out) {
  at::parallel_for(0, N, grain_rows(K / 2), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) int4_row<2, group>(codes, scales, zeros, xo, sums, K, row, m, out, N);
      for (; m < M; ++m) int4_row<1, group>(codes, scales, zeros, xo, sums, K, row, m, out, N);
    }
  });
}

template <typename Scale>
void int4_dispatch(const uint8_t* codes, const Scale* scales, const Scale* zeros, int64_t group,
                   const uint16_t* xo, const float* sums, int64_t M, int64_t N, int64_t K, float* out) {
  switch (group) {
    case 32: int4_all_rows<32>(codes, scales, zeros, xo, sums, M, N, K, out); break;
    case 64: int4_all_rows<64>(codes, scales, zeros, xo, sums, M, N, K, out); break;
    case 128: int4_all_rows<128>(codes, scales, zeros, xo, sums, M, N, K, out); break;
    case 256: int4_all_rows<256>(codes, scales, zeros, xo, sums, M, N, K, out); break;
    default: TORCH_CHECK(false, "gemv_int4: group size ", group, " is not one of 32, 64, 128, 256");
  }
}

}  // namespace

#pragma GCC pop_options

namespace fastllava {

bool avx512_bf16_supported() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("bmi2");
  return supported;
}

void gemv_bf16_avx512(const at::BFloat16* weight, const at::BFloat16* x, int64_t M, int64_t N, int64_t K, float* out) {
  bf16_all_rows(reinterpret_cast<const uint16_t*>(weight), reinterpret_cast<const uint16_t*>(x), M, N, K, out);
}

void gemv_int4_bf16_avx512(const uint8_t* codes, const void* scales, const void* zeros, bool float_scales,
                           int64_t group, const at::BFloat16* x, int64_t M, int64_t N, int64_t K, float* out) {
  // x (M, K) -> per 64 columns [32 even | 32 odd] bf16, and its float sums per group
  std::vector<uint16_t> reordered(static_cast<size_t>(M * K));
  std::vector<float> sums(static_cast<size_t>(M * (K / group)), 0.f);
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  for (int64_t i = 0; i < M * K; i += 64)
    for (int64_t j = 0; j < 32; ++j) reordered[i + j] = bits[i + 2 * j], reordered[i + 32 + j] = bits[i + 2 * j + 1];
  for (int64_t i = 0; i < M * K; ++i) sums[i / group] += static_cast<float>(x[i]);
  if (float_scales)
    int4_dispatch(codes, static_cast<const float*>(scales), static_cast<const float*>(zeros), group,
                  reordered.data(), sums.data(), M, N, K, out);
  else
    int4_dispatch(codes, static_cast<const at::BFloat16*>(scales), static_cast<const at::BFloat16*>(zeros), group,
                  reordered.data(), sums.data(), M, N, K, out);
}

}  // namespace fastllava
