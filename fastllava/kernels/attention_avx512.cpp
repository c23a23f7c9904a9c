// The two inner loops of decode attention (attention.cpp) with AVX-512 on CPUs that have AVX512-BF16, for bf16 K/V
// caches and bf16 queries: scores of 16 keys at once with VDPBF16PS, and the value sum with 16-lane float FMAs.
//
// Why: the AVX2 loops spent ~135 cycles per cached key and K/V head for 7 query heads of 64 dims (Qwen2-0.5B's
// grouped heads; warm caches), ~70 of them in the scores: every head's dot product with every key ends in a
// horizontal sum. Here 16 keys' rows are transposed once into [dim pair][key] registers (16x16 32-bit transposes,
// 4 shuffles per register), shared by all the group's heads; each head then needs one VDPBF16PS per dim pair for
// 16 keys and no horizontal sum. Products of two bf16 values are exact in float32, so the scores differ from the
// float loop's only in the order of float32 sums; the values stay float32 throughout (the probabilities are not
// rounded), so results keep the float loop's accuracy.

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "attention_avx512.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace {

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// r[j] = 16 dwords of row j -> c[i] = (r[0][i], ..., r[15][i]).
inline void transpose16(const __m512i r[16], __m512i c[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // lane k: t[i] = rows i, i+1 at 4k, 4k+1; t[i+1] at 4k+2, 4k+3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // lane k of u[i + b]: rows i..i+3 at column 4k + b
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int b = 0; b < 4; ++b) {
    // lanes of rows 0-7: columns b, 8+b (0x88) or 4+b, 12+b (0xDD); the same for rows 8-15
    const __m512i low_even = _mm512_shuffle_i32x4(u[b], u[4 + b], 0x88);
    const __m512i low_odd = _mm512_shuffle_i32x4(u[b], u[4 + b], 0xDD);
    const __m512i high_even = _mm512_shuffle_i32x4(u[8 + b], u[12 + b], 0x88);
    const __m512i high_odd = _mm512_shuffle_i32x4(u[8 + b], u[12 + b], 0xDD);
    c[b] = _mm512_shuffle_i32x4(low_even, high_even, 0x88);
    c[8 + b] = _mm512_shuffle_i32x4(low_even, high_even, 0xDD);
    c[4 + b] = _mm512_shuffle_i32x4(low_odd, high_odd, 0x88);
    c[12 + b] = _mm512_shuffle_i32x4(low_odd, high_odd, 0xDD);
  }
}

// acc[0 .. 16 NV) += sum over rows i of p[i] * row_i[0 .. 16 NV) (rows float32, D apart), skipping masked rows.
template <int NV>
inline void weighted_pass(const float* p, const float* rows, int64_t n, const bool* valid, int64_t valid_stride,
                          int64_t D, float* acc) {
  __m512 a[NV];
  for (int c = 0; c < NV; ++c) a[c] = _mm512_loadu_ps(acc + 16 * c);
  for (int64_t i = 0; i < n; ++i) {
    if (valid != nullptr && !valid[i * valid_stride]) continue;  // a masked row may hold anything, even NaN
    const __m512 w = _mm512_set1_ps(p[i]);
    const float* row = rows + i * D;
    for (int c = 0; c < NV; ++c) a[c] = _mm512_fmadd_ps(_mm512_loadu_ps(row + 16 * c), w, a[c]);
  }
  for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
}

}  // namespace

namespace fastllava {

void bf16_block_scores(const uint32_t* q_pairs, const at::BFloat16* keys, int64_t stride, int64_t n, int64_t D,
                       int64_t G, float scale, float* scores, int64_t scores_stride) {
  const int64_t pairs = D / 2;  // D is a multiple of 32
  __m512i columns[128];          // [dim pair] -> 16 keys; D <= 256
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t count = std::min<int64_t>(16, n - j0);
    for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
      __m512i rows[16];
      for (int64_t j = 0; j < 16; ++j)
        rows[j] = j < count ? _mm512_loadu_si512(keys + (j0 + j) * stride + 2 * p0) : _mm512_setzero_si512();
      transpose16(rows, columns + p0);
    }
    const __mmask16 keep = static_cast<__mmask16>((1u << count) - 1u);
    for (int64_t h = 0; h < G; ++h) {
      const uint32_t* qh = q_pairs + h * pairs;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t p = 0; p < pairs; p += 4)  // four chains: VDPBF16PS's latency hides behind the others
        for (int u = 0; u < 4; ++u)
          acc[u] = _mm512_dpbf16_ps(acc[u], as_bh(_mm512_set1_epi32(static_cast<int>(qh[p + u]))), as_bh(columns[p + u]));
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
      _mm512_mask_storeu_ps(scores + h * scores_stride + j0, keep, _mm512_mul_ps(sum, scale_v));
    }
  }
}

void weighted_rows_avx512(const float* p, const float* rows, int64_t n, const bool* valid, int64_t valid_stride,
                          int64_t D, float* acc) {
  for (int64_t d0 = 0; d0 < D; d0 += 128) {  // up to 8 registers of 16 dims per pass
    switch (std::min<int64_t>(8, (D - d0) / 16)) {
      case 1: weighted_pass<1>(p, rows + d0, n, valid, valid_stride, D, acc + d0); break;
      case 2: weighted_pass<2>(p, rows + d0, n, valid, valid_stride, D, acc + d0); break;
      case 3: weighted_pass<3>(p, rows + d0, n, valid, valid_stride, D, acc + d0); break;
      case 4: weighted_pass<4>(p, rows + d0, n, valid, valid_stride, D, acc + d0); break;
      case 5: weighted_pass<5>(p, rows + d0, n, valid, valid_stride, D, acc + d0); break;
      case 6: weighted_pass<6>(p, rows + d0, n, valid, valid_stride, D, acc + d0); break;
      case 7: weighted_pass<7>(p, rows + d0, n, valid, valid_stride, D, acc + d0); break;
      default: weighted_pass<8>(p, rows + d0, n, valid, valid_stride, D, acc + d0); break;
    }
  }
}

}  // namespace fastllava

#pragma GCC pop_options
