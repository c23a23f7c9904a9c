// AVX-512 helpers shared by fastllava's AVX-512 loops (gemv_vnni.cpp, attention_avx512.cpp). The header carries its
// own target pragma, so it may be included anywhere; its functions inline into the callers' AVX-512 code.
#pragma once

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f")

namespace fastllava {

// r[j] = the sum of the 16 lanes of a[j], j < 16: one transpose-and-add tree (45 shuffles and adds for 16 sums,
// against ~8 dependent ones per vector for separate horizontal sums).
inline __m512 sum16(const __m512 a[16]) {
  __m512 quads[4];
  for (int g = 0; g < 4; ++g) {
    const __m512* x = a + 4 * g;
    // per 128-bit lane: pairs of partial sums of x0, x1 (and x2, x3), then one partial sum of each of the four
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    quads[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
  }
  // quads[g] 128-bit lane k holds x0..x3 of group g summed over lane k: add the four 128-bit lanes
  const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                 _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                 _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u, w, 0x88), _mm512_shuffle_f32x4(u, w, 0xDD));
}

}  // namespace fastllava

#pragma GCC pop_options
