// The two inner loops of decode attention (attention.cpp) with AVX-512 on CPUs that have AVX512-BF16, for bf16 K/V
// caches and bf16 queries: scores of 16 keys at once with VDPBF16PS, and the value sum with 16-lane float FMAs.
//
// Why: the AVX2 loops spent ~135 cycles per cached key and K/V head for 7 query heads of 64 dims (Qwen2-0.5B's
// grouped heads; warm caches), ~70 of them in the scores: every head's dot product with every key ends in a
// horizontal sum. Here 16 keys' rows are transposed once into [dim pair][key] registers (16x16 32-bit transposes,
// 4 shuffles per register), shared by all the group's heads; each head then needs one VDPBF16PS per dim pair for
// 16 keys and no horizontal sum. Products of two bf16 values are exact in float32, so the scores differ from the
// float loop's only in the order of float32 sums; the values stay float32 throughout (the probabilities are not
// rounded), so results keep the float loop's accuracy. A head with its own K/V (single_head) needs no transpose: each
// key's dot product is C VDPBF16PS and one transpose-and-add tree sums 16 keys' lanes; that loop runs the softmax
// online so that K and V rows are read together (attention.cpp has the measurements).

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "attention_avx512.h"
#include "vector_math.h"  // exp8, exp1
#include "vector_math_avx512.h"  // sum16

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

using fastllava::sum16;  // r[j] = sum of the 16 lanes of a[j]

inline __m512 bf16x16_to_float(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline __m512 exp16(__m512 x) {  // vector_math.h's exp8 (<= 1 ulp, exp(-inf) = 0) on both halves
  const __m256 low = fastllava::exp8(_mm512_castps512_ps256(x));
  const __m256 high = fastllava::exp8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  return _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1);
}

// One query head (q: C * 32 bf16) over its own S keys and values, read in one pass: per 16 keys the scores
// (one VDPBF16PS per 32 dims and key, one transpose-and-add tree), a running max and sum (the online softmax:
// earlier sums are rescaled when the max grows), and the value rows' weighted sum. out (32 C floats) =
// softmax(scale q.k) v; zeros where no key is valid. Masked keys' rows are never read (they may hold NaN).
template <int C>
void single_head(const at::BFloat16* q, const at::BFloat16* keys, int64_t k_stride, const at::BFloat16* values,
                 int64_t v_stride, int64_t S, const bool* valid, int64_t valid_stride, float scale, float* out) {
  __m512i qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_si512(q + 32 * c);
  // value sums by 32-dim chunk, even and odd dims apart: a bf16 pair in a 32-bit lane becomes two floats with one
  // shift (the even dim) and one mask (the odd), instead of a widening and a shift per 16 dims
  __m512 even[C], odd[C];
  for (int c = 0; c < C; ++c) even[c] = odd[c] = _mm512_setzero_ps();
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m512 scale_v = _mm512_set1_ps(scale), neg_inf_v = _mm512_set1_ps(neg_inf);
  __m512 sums = _mm512_setzero_ps();
  float max = neg_inf;
  alignas(64) float p[16];
  for (int64_t j0 = 0; j0 < S; j0 += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, S - j0));
    uint32_t live = (1u << count) - 1u;
    if (valid != nullptr) {
      if (valid_stride == 1 && count == 16)  // bools are bytes 0 or 1
        live = _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(valid + j0)), _mm_set1_epi8(1));
      else
        for (int j = 0; j < count; ++j)
          if (!valid[(j0 + j) * valid_stride]) live &= ~(1u << j);
    }
    if (live == 0) continue;
    __m512 dots[16];
    for (int j = 0; j < 16; ++j) {
      dots[j] = _mm512_setzero_ps();
      if (!((live >> j) & 1u)) continue;
      const at::BFloat16* row = keys + (j0 + j) * k_stride;
      for (int c = 0; c < C; ++c)
        dots[j] = _mm512_dpbf16_ps(dots[j], as_bh(qv[c]), as_bh(_mm512_loadu_si512(row + 32 * c)));
    }
    const __m512 scores = _mm512_mask_blend_ps(static_cast<__mmask16>(live), neg_inf_v,
                                               _mm512_mul_ps(sum16(dots), scale_v));
    const float block_max = _mm512_reduce_max_ps(scores);
    if (block_max > max) {  // rescale what was summed against the old max (exp(-inf) = 0 for the first block)
      const __m512 factor = _mm512_set1_ps(fastllava::exp1(max - block_max));
      for (int c = 0; c < C; ++c) {
        even[c] = _mm512_mul_ps(even[c], factor);
        odd[c] = _mm512_mul_ps(odd[c], factor);
      }
      sums = _mm512_mul_ps(sums, factor);
      max = block_max;
    }
    const __m512 weights = exp16(_mm512_sub_ps(scores, _mm512_set1_ps(max)));  // masked lanes: exp(-inf) = 0
    sums = _mm512_add_ps(sums, weights);
    _mm512_store_ps(p, weights);
    for (int j = 0; j < 16; ++j) {
      if (!((live >> j) & 1u)) continue;
      const __m512 w = _mm512_set1_ps(p[j]);
      const at::BFloat16* row = values + (j0 + j) * v_stride;
      for (int c = 0; c < C; ++c) {
        const __m512i pairs = _mm512_loadu_si512(row + 32 * c);
        even[c] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)), w, even[c]);
        odd[c] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(pairs, high_half)), w, odd[c]);
      }
    }
  }
  const float total = _mm512_reduce_add_ps(sums);
  const __m512 inverse = _mm512_set1_ps(max == neg_inf ? 0.f : 1.f / total);
  // back to dim order: lanes i of even and odd are dims 2i and 2i + 1 of the chunk
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int c = 0; c < C; ++c) {
    _mm512_storeu_ps(out + 32 * c, _mm512_mul_ps(_mm512_permutex2var_ps(even[c], first, odd[c]), inverse));
    _mm512_storeu_ps(out + 32 * c + 16, _mm512_mul_ps(_mm512_permutex2var_ps(even[c], second, odd[c]), inverse));
  }
}

}  // namespace

namespace fastllava {

void bf16_single_head_attention(const at::BFloat16* q, const at::BFloat16* keys, int64_t k_stride,
                                const at::BFloat16* values, int64_t v_stride, int64_t S, int64_t D, const bool* valid,
                                int64_t valid_stride, float scale, float* out) {
  switch (D / 32) {
    case 1: single_head<1>(q, keys, k_stride, values, v_stride, S, valid, valid_stride, scale, out); break;
    case 2: single_head<2>(q, keys, k_stride, values, v_stride, S, valid, valid_stride, scale, out); break;
    case 3: single_head<3>(q, keys, k_stride, values, v_stride, S, valid, valid_stride, scale, out); break;
    case 4: single_head<4>(q, keys, k_stride, values, v_stride, S, valid, valid_stride, scale, out); break;
    case 5: single_head<5>(q, keys, k_stride, values, v_stride, S, valid, valid_stride, scale, out); break;
    case 6: single_head<6>(q, keys, k_stride, values, v_stride, S, valid, valid_stride, scale, out); break;
    case 7: single_head<7>(q, keys, k_stride, values, v_stride, S, valid, valid_stride, scale, out); break;
    default: single_head<8>(q, keys, k_stride, values, v_stride, S, valid, valid_stride, scale, out); break;
  }
}

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
