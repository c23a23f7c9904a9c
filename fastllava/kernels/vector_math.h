// AVX2 helpers shared by fastllava's kernels: loading fp32/bf16/fp16 as 8 floats, storing 8 floats back with
// PyTorch's rounding (round to nearest even), and a vectorised exp.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace fastllava {

inline float bits_to_float(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static inline float load1(const float* p) { return *p; }
  static inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
  static inline __m256 round(__m256 v) { return v; }
};

template <>
struct Vec<at::BFloat16> {  // a bf16 is the top half of a float
  static inline __m256 load(const at::BFloat16* p) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static inline float load1(const at::BFloat16* p) { return bits_to_float(static_cast<uint32_t>(p->x) << 16); }
  // the float's bits rounded to nearest even at bit 16, as c10::BFloat16(float) does (NaN -> 0x7fc0)
  static inline __m256i rounded_bits(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i out = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(out, _mm256_set1_epi32(0x7fc00000), nan);
  }
  static inline void store(at::BFloat16* p, __m256 v) {
    const __m256i top = _mm256_srli_epi32(rounded_bits(v), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static inline __m256 round(__m256 v) {
    return _mm256_castsi256_ps(_mm256_and_si256(rounded_bits(v), _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
};

template <>
struct Vec<at::Half> {
  static inline __m256 load(const at::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline float load1(const at::Half* p) { return _cvtsh_ss(p->x); }
  static inline void store(at::Half* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline __m256 round(__m256 v) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

// One value rounded to T and back (PyTorch storing an intermediate in T).
template <typename T>
inline float round_to(float value) {
  return static_cast<float>(static_cast<T>(value));
}
template <>
inline float round_to<float>(float value) {
  return value;
}

inline float horizontal_sum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float horizontal_max(__m256 v) {
  __m128 lo = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// exp(x) = 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2]. ln 2 is split into
// float(ln 2) + (the rest): with FMA, x - n * float(ln 2) is exact (both terms are multiples of 2^-24 and the
// difference is below 1/2, so it fits in 24 bits), and the second term's rounding is ~2^-48 * |n|. e^r =
// 1 + r + r^2 P(r), P of degree 5 fitted to minimise the relative error on that interval (5e-11, far below
// float32's 6e-8). 2^n is applied as two exact power-of-two factors, so results down to the subnormal range need
// no special case. Measured against double exp over every float32 in [-104, 88.7]: at most 1 ulp (the tests
// check a dense sample through the exp_avx2 op). x < -104 gives 0 (exp(-inf) = 0: masked scores), x > 88.72
// gives inf, NaN stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-104.0f), hi = _mm256_set1_ps(88.72283935546875f);
  const __m256 too_small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 too_big = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269502162933349609375f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147182464599609375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-1.904654323148236e-09f), r);
  __m256 p = _mm256_set1_ps(0.00019790366059169173f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.0013944651000201702f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.008333496749401093f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.04166629537940025f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.1666666567325592f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  // 2^n = 2^a * 2^b, a = n >> 1, b = n - a: n in [-150, 128] keeps both exponents normal
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i a = _mm256_srai_epi32(ni, 1), b = _mm256_sub_epi32(ni, a);
  const __m256i bias = _mm256_set1_epi32(127);
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23)));
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23)));
  p = _mm256_andnot_ps(too_small, p);
  p = _mm256_blendv_ps(p, _mm256_set1_ps(std::numeric_limits<float>::infinity()), too_big);
  return _mm256_blendv_ps(p, x, nan);
}

inline float exp1(float x) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, exp8(_mm256_set1_ps(x)));
  return lanes[0];
}

}  // namespace fastllava
