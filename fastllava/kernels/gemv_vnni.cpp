// int8 and int4 few-row products with AVX512-VNNI integer dot products, on CPUs with AVX512-VNNI (Zen 4, Ice Lake
// and newer): y (M, N) = x (M, K) @ W^T for int8 W (N, K) with per-row scales, or for int4 W in gemv.cpp's layout
// (codes (N, K/2), w = (q - 8) s + z per group), float x. gemv.cpp calls these when the CPU has VNNI, AVX-512 is
// switched on (``set_avx512``) and K is a multiple of 128; else its AVX2 loops.
//
// Why: the AVX2 loops widen codes to floats (int8: ~4 instructions per 8 weights) and were compute-bound at ~15-16
// (int8) and ~23 (int4 with int8 activations) G weights/s on one Zen 4 core, half what the codes could stream at.
// VPDPBUSD multiplies 64 unsigned bytes by 64 signed bytes and adds each 4 products into 16 int32 lanes.
//
// Activations, two ways:
// - two parts (int8 weights; int4 through gemv_int4): each x row is split per block of 128 columns into two int8
//   parts, x ~= d (hi + lo / 256) with d = max|x| / 127, hi = round(x / d), lo = round((x - d hi) 256 / d)
//   (clamped to +-127), so the representation error is <= d / 256 = max|x| / 32512 per block, below bf16's own
//   rounding of any value within 1/64 of its block's largest: activations stay as precise as bf16. The integer
//   sums are exact: lane = 256 dot(w, hi) + dot(w, lo).
// - one part (int4 through gemv_int4_q8, the default int4 decode kernel): per block of 32 columns, rounded exactly
//   as gemv.cpp's AVX2 int4 loop rounds them (llama.cpp's Q8_0 idea), so both ISAs give the same results.
// int8: VPDPBUSD wants unsigned bytes on one side: the weights are read as w + 128 (a xor with 0x80), and
// 128 * sum(256 hi + lo) d / 256 per x row is subtracted at the end. int4: the codes are unsigned already; lane i of
// a 128-column chunk covers columns [8i, 8i + 8) (x stored per chunk as its 64 even columns, then its 64 odd ones,
// the nibbles' order), scaled by its block's d and its group's scale; -8 s and the zeros are applied per group
// from the x sums at the end of the row.
//
// Measured (one thread, Zen 4, llava-interleave-qwen-0.5b decode, benchmarks/bench_quantization.py): int8 30.7 ->
// 42.0 tok/s, int4 41.4 -> 54.3. Still compute-bound: Zen 4 executes these 512-bit integer instructions at about
// one a cycle (int4 ~10 per 128 weights). Tried and slower: software prefetch ahead of the weight stream (15-20 vs
// 20 GB/s) and two weight rows per pass sharing the x loads (8 GB/s: two interleaved streams defeat the hardware
// prefetcher).
//
// Batch 1 (one x row): each weight row's 16 lanes are kept and 16 rows are summed by one transpose-and-add tree
// (sum16) instead of a horizontal sum per row; with the int4 chunks unrolled per scale window (constant permute
// indices), warm-cache speed at K = 896 rose 25.7-32.2 -> 32.7-36.0 G weights/s (int4) and 29.9-30.8 -> 37.1-37.7
// (int8). Tried and dropped: 2 or 4 weight rows side by side sharing the x loads: 44-50 G weights/s warm but 8-13
// from memory (Zen 4's prefetchers lose the interleaved rows; a software prefetch cursor won back only part).
//
// Compiled with a target pragma like gemv_avx512.cpp: the library still loads on CPUs without AVX-512.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gemv_avx512.h"
#include "vector_math_avx512.h"  // sum16

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,bmi2")

namespace {

constexpr int64_t kBlock = 128;  // columns per activation scale (two parts) and per int4 chunk

// x (M, K) float -> hi, lo (M, K) int8 and d (M, K / 128) = block scale / 256; correction (M):
// 128 * sum_b d_b / 256 * sum_{k in b} (256 hi_k + lo_k). With `deinterleave` each 128 columns are stored as
// their 64 even columns, then the 64 odd ones (the int4 codes' nibble order), and per group of `group` columns
// x_sums (M, K / group) = sum x and q_sums (M, K / group) = d / 256 * sum (256 hi + lo).
void split_rows(const float* x, int64_t M, int64_t K, int8_t* hi, int8_t* lo, float* scales, float* correction,
                bool deinterleave = false, int64_t group = 0, float* x_sums = nullptr, float* q_sums = nullptr) {
  const __m512 limit = _mm512_set1_ps(127.f), negative_limit = _mm512_set1_ps(-127.f);
  auto round_clamped = [&](__m512 v) {  // round half even, clamped: x * (1 / d) can land a hair past 127
    return _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                       negative_limit), limit);
  };
  for (int64_t m = 0; m < M; ++m) {
    double total = 0.0;
    for (int64_t b = 0; b < K / kBlock; ++b) {
      const float* src = x + m * K + b * kBlock;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t j = 0; j < kBlock; j += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(src + j)));
      const float d = _mm512_reduce_max_ps(amax) / 127.f;
      int8_t* h = hi + m * K + b * kBlock;
      int8_t* l = lo + m * K + b * kBlock;
      int64_t sum = 0;
      if (d != 0.f && std::isfinite(d)) {
        const __m512 inv = _mm512_set1_ps(1.f / d), dv = _mm512_set1_ps(d), lo_scale = _mm512_set1_ps(256.f / d);
        for (int64_t j = 0; j < kBlock; j += 16) {
          const __m512 v = _mm512_loadu_ps(src + j);
          const __m512 qh = round_clamped(_mm512_mul_ps(v, inv));
          const __m512 ql = round_clamped(_mm512_mul_ps(_mm512_fnmadd_ps(qh, dv, v), lo_scale));
          const __m512i ih = _mm512_cvtps_epi32(qh), il = _mm512_cvtps_epi32(ql);
          const __m512i both = _mm512_add_epi32(_mm512_slli_epi32(ih, 8), il);
          sum += _mm512_reduce_add_epi32(both);
          if (!deinterleave) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(h + j), _mm512_cvtsepi32_epi8(ih));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(l + j), _mm512_cvtsepi32_epi8(il));
            continue;
          }
          // 16 columns j..j+15 (one group: groups are multiples of 32) -> 8 even ones at h + j/2, 8 odd ones at
          // h + 64 + j/2; one shuffle puts the even bytes in the low half, the odd ones in the high half
          const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
          const __m128i hs = _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(ih), order);
          const __m128i ls = _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(il), order);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(h + j / 2), hs);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(h + kBlock / 2 + j / 2), _mm_unpackhi_epi64(hs, hs));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(l + j / 2), ls);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(l + kBlock / 2 + j / 2), _mm_unpackhi_epi64(ls, ls));
          q_sums[m * (K / group) + (b * kBlock + j) / group] +=
              d / 256.f * static_cast<float>(_mm512_reduce_add_epi32(both));
        }
      } else {  // an all-zero (or non-finite) block: zero codes, d = 0
        std::fill(h, h + kBlock, 0), std::fill(l, l + kBlock, 0);
      }
      if (deinterleave)
        for (int64_t j = 0; j < kBlock; j += 16)
          x_sums[m * (K / group) + (b * kBlock + j) / group] += _mm512_reduce_add_ps(_mm512_loadu_ps(src + j));
      scales[m * (K / kBlock) + b] = d / 256.f;
      total += static_cast<double>(d) / 256.0 * static_cast<double>(sum);
    }
    correction[m] = static_cast<float>(128.0 * total);
  }
}

// One int8 part per block of 32 columns, the rounding of gemv.cpp's AVX2 int4 loop (quantize_q8_rows): d = max|x| /
// 127, q = round-half-even(x / d) (a true division, as there), 0 for an all-zero block. Stored per 128 columns as
// [64 even | 64 odd] columns; d16 (M, K / 128, 16): lane i's block d (lane i covers columns [8i, 8i + 8): block
// i / 4); x_sums and q_sums (M, K / group): sum x and sum d q per group.
void quantize_one_part(const float* x, int64_t M, int64_t K, int64_t group, int8_t* q, float* d16, float* x_sums,
                       float* q_sums) {
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / 32; ++b) {
      const float* src = x + m * K + b * 32;
      const __m512 v[2] = {_mm512_loadu_ps(src), _mm512_loadu_ps(src + 16)};
      const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1]))) / 127.f;
      const int64_t chunk = b / 4, within = (b % 4) * 32;  // the block's first column within its 128
      int8_t* dst = q + m * K + chunk * kBlock;
      int64_t sum = 0;
      for (int half = 0; half < 2; ++half) {
        __m512i qi = _mm512_setzero_si512();
        if (d != 0.f) {
          qi = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(v[half], _mm512_set1_ps(d)),
                                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
          sum += _mm512_reduce_add_epi32(qi);
        }
        const __m128i bytes = _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(qi), order);  // [8 even | 8 odd]
        const int64_t j = within + 16 * half;
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + j / 2), bytes);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + kBlock / 2 + j / 2), _mm_unpackhi_epi64(bytes, bytes));
        x_sums[m * (K / group) + (b * 32 + 16 * half) / group] += _mm512_reduce_add_ps(v[half]);
      }
      q_sums[m * (K / group) + b * 32 / group] += d * static_cast<float>(sum);
      float* lanes = d16 + (m * (K / kBlock) + chunk) * 16 + (b % 4) * 4;
      for (int t = 0; t < 4; ++t) lanes[t] = d;
    }
}

// Where weight row `row`'s 128 columns from k start: row-major, or in the pair layout (Pairs: rows 2p and 2p + 1
// stored block by block, [2p, block b][2p + 1, block b], so one sequential stream feeds two rows; see
// kernels/int8_pairs.cpp).
template <bool Pairs>
inline const int8_t* int8_block(const int8_t* w, int64_t K, int64_t row, int64_t k) {
  if constexpr (Pairs) return w + (row & ~int64_t{1}) * K + 2 * k + (row & 1) * kBlock;
  else return w + row * K + k;
}

// Weight row `row` against x rows [m, m + MR): each x row's 16 lane totals. Per 128 columns and x row: lane =
// 256 (w+128).hi + (w+128).lo over its 8 columns (|lane| < 2^27), converted once and scaled by the block's d / 256.
template <int MR, bool Pairs>
inline void int8_lanes(const int8_t* w, const int8_t* hi, const int8_t* lo, const float* scales, int64_t K,
                       int64_t row, int64_t m, __m512* total) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int i = 0; i < MR; ++i) total[i] = _mm512_setzero_ps();
  for (int64_t k = 0, b = 0; k < K; k += kBlock, ++b) {
    const int8_t* wb = int8_block<Pairs>(w, K, row, k);
    const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(wb), flip);
    const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(wb + 64), flip);
    for (int i = 0; i < MR; ++i) {
      const int64_t base = (m + i) * K + k;
      __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(hi + base));
      acc = _mm512_dpbusd_epi32(acc, w1, _mm512_loadu_si512(hi + base + 64));
      acc = _mm512_dpbusd_epi32(_mm512_slli_epi32(acc, 8), w0, _mm512_loadu_si512(lo + base));
      acc = _mm512_dpbusd_epi32(acc, w1, _mm512_loadu_si512(lo + base + 64));
      total[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(scales[(m + i) * (K / kBlock) + b]), total[i]);
    }
  }
}

// One x row against the two rows of a pair (pair layout, `row` even): int8_lanes<1>'s sums for both, each x block
// loaded once for the two. The arithmetic per row is int8_lanes' exactly, so the results are the same bit for bit.
inline void int8_pair_lanes(const int8_t* w, const int8_t* hi, const int8_t* lo, const float* scales, int64_t K,
                            int64_t row, __m512* total) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  total[0] = total[1] = _mm512_setzero_ps();
  const int8_t* pair = w + row * K;
  for (int64_t k = 0, b = 0; k < K; k += kBlock, ++b) {
    const __m512i h0 = _mm512_loadu_si512(hi + k), h1 = _mm512_loadu_si512(hi + k + 64);
    const __m512i l0 = _mm512_loadu_si512(lo + k), l1 = _mm512_loadu_si512(lo + k + 64);
    const __m512 scale = _mm512_set1_ps(scales[b]);
    for (int r = 0; r < 2; ++r) {
      const int8_t* wb = pair + 2 * k + r * kBlock;
      const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(wb), flip);
      const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(wb + 64), flip);
      __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, h0);
      acc = _mm512_dpbusd_epi32(acc, w1, h1);
      acc = _mm512_dpbusd_epi32(_mm512_slli_epi32(acc, 8), w0, l0);
      acc = _mm512_dpbusd_epi32(acc, w1, l1);
      total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), scale, total[r]);
    }
  }
}

// out[m + i, row] for x rows [m, m + MR): the lanes summed, the +128 removed, times the row's scale.
template <int MR, bool Pairs>
inline void int8_row(const int8_t* w, const int8_t* hi, const int8_t* lo, const float* scales, const float* correction,
                     float row_scale, int64_t K, int64_t row, int64_t m, float* out, int64_t N) {
  __m512 total[MR];
  int8_lanes<MR, Pairs>(w, hi, lo, scales, K, row, m, total);
  for (int i = 0; i < MR; ++i) out[(m + i) * N + row] = (_mm512_reduce_add_ps(total[i]) - correction[m + i]) * row_scale;
}

using fastllava::sum16;

// One x row (decode, batch 1): out[n] for n < N, 16 weight rows at a time: lanes(n, v) puts row n's 16 lane totals in
// v, one transpose-and-add tree sums the 16 rows and finish(sums, row) stores them; rows after the last block of 16
// go through tail(n). The weight rows stay one sequential stream (see the header for what interleaving them cost).
// With Step 2, lanes(n, v) fills rows n and n + 1 (v[0], v[1]).
template <int Step = 1, typename Lanes, typename Finish, typename Tail>
void one_x_row_by_sixteen(int64_t N, int64_t grain, const Lanes& lanes, const Finish& finish, const Tail& tail) {
  const int64_t blocks = N / 16;
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain / 16), [&](int64_t begin, int64_t end) {
    __m512 totals[16];
    for (int64_t block = begin; block < end; ++block) {
      for (int r = 0; r < 16; r += Step) lanes(block * 16 + r, totals + r);
      finish(sum16(totals), block * 16);
    }
  });
  for (int64_t n = blocks * 16; n < N; ++n) tail(n);
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// 16 scales or zeros from p as floats, the first n of them (the rest zero).
inline __m512 load16(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(n))), p);
}
inline __m512 load16(const at::BFloat16* p, int64_t n) {
  const __m256i bits = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(n))), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// The int4 group scale of each of the 16 lanes of chunk first + slot (lane i covers columns [8i, 8i + 8)), `first` a
// multiple of the chunks one window covers. Groups of 128 and more: one scale. Smaller groups: the scales of 16
// groups are loaded once as a vector (`window`, at slot 0) and each chunk takes its 2 or 4 of them with one permute.
template <int64_t group, typename Scale>
inline __m512 chunk_scales(const Scale* row_scales, int64_t groups, int64_t first, int64_t slot, __m512& window) {
  if constexpr (group >= kBlock) {
    return _mm512_set1_ps(to_float(row_scales[(first + slot) * kBlock / group]));
  } else {
    constexpr int64_t per_chunk = kBlock / group;
    if (slot == 0) window = load16(row_scales + first * per_chunk, std::min<int64_t>(16, groups - first * per_chunk));
    const __m512i index = per_chunk == 2 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                         : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(_mm512_add_epi32(index, _mm512_set1_epi32(static_cast<int>(slot * per_chunk))), window);
  }
}

// int4 weight row `row` (codes (N, K/2), w = (q - 8) s + z per group) against x rows [m, m + MR):
// y = sum_g s_g (sum_{k in g} q_k x_k - 8 q_sum_g) + z_g x_sum_g, the first part from integer lanes per 8
// columns: Parts 2, 256 q.hi + q.lo scaled by the chunk's d / 256; Parts 1, q.x8 scaled by the lane's block d
// (d16); both times the lane's group scale.
template <int Parts, int MR, int64_t group, typename Scale>
inline void int4_lanes(const uint8_t* codes, const Scale* scales, const Scale* zeros, const int8_t* hi,
                       const int8_t* lo, const float* d, const float* x_sums, const float* q_sums, int64_t K,
                       int64_t row, int64_t m, __m512* total) {
  const int64_t groups = K / group, chunks = K / kBlock;
  const uint8_t* rc = codes + row * (K / 2);
  const Scale* rs = scales + row * groups;
  const Scale* rz = zeros + row * groups;
  const __m512i low = _mm512_set1_epi8(15);
  for (int i = 0; i < MR; ++i) total[i] = _mm512_setzero_ps();
  __m512 window = _mm512_setzero_ps();
  // chunks in runs of one scale window, unrolled so that each chunk's permute index is a constant
  constexpr int64_t run = group >= kBlock ? 1 : 16 / (kBlock / group);
  for (int64_t first = 0; first < chunks; first += run) {
#pragma GCC unroll 16
    for (int64_t slot = 0; slot < run; ++slot) {
      const int64_t c = first + slot;
      if (c >= chunks) break;
      const __m512i bytes = _mm512_loadu_si512(rc + c * (kBlock / 2));
      const __m512i even = _mm512_and_si512(bytes, low), odd = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
      const __m512 s = chunk_scales<group>(rs, groups, first, slot, window);
      for (int i = 0; i < MR; ++i) {
        const int64_t base = (m + i) * K + c * kBlock;
        __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(hi + base));
        acc = _mm512_dpbusd_epi32(acc, odd, _mm512_loadu_si512(hi + base + 64));
        __m512 lane_d;
        if constexpr (Parts == 2) {
          acc = _mm512_dpbusd_epi32(_mm512_slli_epi32(acc, 8), even, _mm512_loadu_si512(lo + base));
          acc = _mm512_dpbusd_epi32(acc, odd, _mm512_loadu_si512(lo + base + 64));
          lane_d = _mm512_set1_ps(d[(m + i) * chunks + c]);
        } else {
          lane_d = _mm512_loadu_ps(d + ((m + i) * chunks + c) * 16);
        }
        total[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(s, lane_d), total[i]);
      }
    }
  }
  for (int64_t g = 0; g < groups; g += 16) {  // the -8 and zero parts, 16 groups at a time
    const int64_t n = std::min<int64_t>(16, groups - g);
    const __m512 s = load16(rs + g, n), z = load16(rz + g, n);
    for (int i = 0; i < MR; ++i) {
      const __m512 qs = _mm512_maskz_loadu_ps(static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(n))),
                                              q_sums + (m + i) * groups + g);
      const __m512 xs = _mm512_maskz_loadu_ps(static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(n))),
                                              x_sums + (m + i) * groups + g);
      total[i] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(-8.f)), qs, _mm512_fmadd_ps(z, xs, total[i]));
    }
  }
}

template <int Parts, int MR, int64_t group, typename Scale>
inline void int4_row(const uint8_t* codes, const Scale* scales, const Scale* zeros, const int8_t* hi,
                     const int8_t* lo, const float* d, const float* x_sums, const float* q_sums, int64_t K,
                     int64_t row, int64_t m, float* out, int64_t N) {
  __m512 total[MR];
  int4_lanes<Parts, MR, group>(codes, scales, zeros, hi, lo, d, x_sums, q_sums, K, row, m, total);
  for (int i = 0; i < MR; ++i) out[(m + i) * N + row] = _mm512_reduce_add_ps(total[i]);
}

template <int Parts, int64_t group, typename Scale>
void int4_all_rows(const uint8_t* codes, const Scale* scales, const Scale* zeros, const float* x, int64_t M,
                   int64_t N, int64_t K, float* out) {
  const int64_t groups = K / group;
  std::vector<int8_t> hi(static_cast<size_t>(M * K)), lo(Parts == 2 ? static_cast<size_t>(M * K) : 0);
  std::vector<float> d(static_cast<size_t>(M * (K / kBlock) * (Parts == 2 ? 1 : 16)));
  std::vector<float> x_sums(static_cast<size_t>(M * groups), 0.f), q_sums(static_cast<size_t>(M * groups), 0.f);
  if constexpr (Parts == 2) {
    std::vector<float> correction(static_cast<size_t>(M));  // the int8 loop's; unused here
    split_rows(x, M, K, hi.data(), lo.data(), d.data(), correction.data(), true, group, x_sums.data(), q_sums.data());
  } else {
    quantize_one_part(x, M, K, group, hi.data(), d.data(), x_sums.data(), q_sums.data());
  }
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K / 2));
  if (M == 1) {
    one_x_row_by_sixteen(
        N, grain,
        [&](int64_t n, __m512* lanes) {
          int4_lanes<Parts, 1, group>(codes, scales, zeros, hi.data(), lo.data(), d.data(), x_sums.data(),
                                      q_sums.data(), K, n, 0, lanes);
        },
        [&](__m512 sums, int64_t row) { _mm512_storeu_ps(out + row, sums); },
        [&](int64_t n) {
          int4_row<Parts, 1, group>(codes, scales, zeros, hi.data(), lo.data(), d.data(), x_sums.data(),
                                    q_sums.data(), K, n, 0, out, N);
        });
    return;
  }
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        int4_row<Parts, 4, group>(codes, scales, zeros, hi.data(), lo.data(), d.data(), x_sums.data(), q_sums.data(),
                                  K, n, m, out, N);
      for (; m + 2 <= M; m += 2)
        int4_row<Parts, 2, group>(codes, scales, zeros, hi.data(), lo.data(), d.data(), x_sums.data(), q_sums.data(),
                                  K, n, m, out, N);
      for (; m < M; ++m)
        int4_row<Parts, 1, group>(codes, scales, zeros, hi.data(), lo.data(), d.data(), x_sums.data(), q_sums.data(),
                                  K, n, m, out, N);
    }
  });
}

template <int Parts, typename Scale>
void int4_dispatch(const uint8_t* codes, const Scale* scales, const Scale* zeros, int64_t group, const float* x,
                   int64_t M, int64_t N, int64_t K, float* out) {
  switch (group) {
    case 32: int4_all_rows<Parts, 32>(codes, scales, zeros, x, M, N, K, out); break;
    case 64: int4_all_rows<Parts, 64>(codes, scales, zeros, x, M, N, K, out); break;
    case 128: int4_all_rows<Parts, 128>(codes, scales, zeros, x, M, N, K, out); break;
    default: int4_all_rows<Parts, 256>(codes, scales, zeros, x, M, N, K, out); break;
  }
}

template <typename Scale>
void int4_parts(int parts, const uint8_t* codes, const Scale* scales, const Scale* zeros, int64_t group,
                const float* x, int64_t M, int64_t N, int64_t K, float* out) {
  if (parts == 2) int4_dispatch<2>(codes, scales, zeros, group, x, M, N, K, out);
  else int4_dispatch<1>(codes, scales, zeros, group, x, M, N, K, out);
}

// int8, one x row: the lanes' sums less the +128 correction, times each row's scale (pair layout: two rows a pass).
template <bool Pairs, typename Scale>
void int8_one_x_row(const int8_t* weight, const Scale* row_scales, const int8_t* hi, const int8_t* lo,
                    const float* scales, float correction, int64_t N, int64_t K, int64_t grain, float* out) {
  auto finish = [&](__m512 sums, int64_t row) {
    _mm512_storeu_ps(out + row, _mm512_mul_ps(_mm512_sub_ps(sums, _mm512_set1_ps(correction)),
                                              load16(row_scales + row, 16)));
  };
  auto tail = [&](int64_t n) {
    int8_row<1, Pairs>(weight, hi, lo, scales, &correction, to_float(row_scales[n]), K, n, 0, out, N);
  };
  if constexpr (Pairs)
    one_x_row_by_sixteen<2>(
        N, grain, [&](int64_t n, __m512* lanes) { int8_pair_lanes(weight, hi, lo, scales, K, n, lanes); }, finish,
        tail);
  else
    one_x_row_by_sixteen(
        N, grain, [&](int64_t n, __m512* lanes) { int8_lanes<1, false>(weight, hi, lo, scales, K, n, 0, lanes); },
        finish, tail);
}

template <bool Pairs>
void gemv_int8_layout(const int8_t* weight, const void* row_scales, bool float_scales, const float* x, int64_t M,
                      int64_t N, int64_t K, float* out) {
  std::vector<int8_t> hi(static_cast<size_t>(M * K)), lo(static_cast<size_t>(M * K));
  std::vector<float> scales(static_cast<size_t>(M * (K / kBlock))), correction(static_cast<size_t>(M));
  split_rows(x, M, K, hi.data(), lo.data(), scales.data(), correction.data());
  // runs of >= 64 KiB of weights per task: a small layer is not worth waking a second thread for
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K));
  if (M == 1) {
    if (float_scales)
      int8_one_x_row<Pairs>(weight, static_cast<const float*>(row_scales), hi.data(), lo.data(), scales.data(),
                            correction[0], N, K, grain, out);
    else
      int8_one_x_row<Pairs>(weight, static_cast<const at::BFloat16*>(row_scales), hi.data(), lo.data(), scales.data(),
                            correction[0], N, K, grain, out);
    return;
  }
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float scale = float_scales ? static_cast<const float*>(row_scales)[n]
                                       : static_cast<float>(static_cast<const at::BFloat16*>(row_scales)[n]);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        int8_row<4, Pairs>(weight, hi.data(), lo.data(), scales.data(), correction.data(), scale, K, n, m, out, N);
      for (; m + 2 <= M; m += 2)
        int8_row<2, Pairs>(weight, hi.data(), lo.data(), scales.data(), correction.data(), scale, K, n, m, out, N);
      for (; m < M; ++m)
        int8_row<1, Pairs>(weight, hi.data(), lo.data(), scales.data(), correction.data(), scale, K, n, m, out, N);
    }
  });
}

}  // namespace

#pragma GCC pop_options

namespace fastllava {

bool avx512_vnni_supported() {
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("bmi2");
  return supported;
}

void gemv_int8_vnni(const int8_t* weight, const void* row_scales, bool float_scales, const float* x, int64_t M,
                    int64_t N, int64_t K, float* out, bool pairs) {
  if (pairs) gemv_int8_layout<true>(weight, row_scales, float_scales, x, M, N, K, out);
  else gemv_int8_layout<false>(weight, row_scales, float_scales, x, M, N, K, out);
}

void gemv_int4_vnni(const uint8_t* codes, const void* scales, const void* zeros, bool float_scales, int64_t group,
                    int parts, const float* x, int64_t M, int64_t N, int64_t K, float* out) {
  TORCH_CHECK(group == 32 || group == 64 || group == 128 || group == 256, "gemv_int4_vnni: group size ", group);
  TORCH_CHECK(parts == 1 || parts == 2, "gemv_int4_vnni: parts must be 1 or 2");
  if (float_scales)
    int4_parts(parts, codes, static_cast<const float*>(scales), static_cast<const float*>(zeros), group, x, M, N, K,
               out);
  else
    int4_parts(parts, codes, static_cast<const at::BFloat16*>(scales), static_cast<const at::BFloat16*>(zeros), group,
               x, M, N, K, out);
}

}  // namespace fastllava
