// AVX-512 BF16 few-row products: y (M, N) = x (M, K) @ W^T for bf16 x and bf16 W, float32 results, on CPUs with
// AVX512-BF16 (Zen 4, Sapphire Rapids and newer). gemv.cpp calls these when the CPU has the instructions and they
// are switched on (``set_avx512``), else its AVX2 loops.
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

}  // namespace fastllava
