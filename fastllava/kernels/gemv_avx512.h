// The AVX-512 BF16 products of gemv_avx512.cpp, called by gemv.cpp after a runtime CPU check.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastllava {

// The CPU has AVX512F/BW/VL/DQ, AVX512-BF16 and BMI2 (checked once).
bool avx512_bf16_supported();

// The AVX-512 loops may be used: the CPU has them and set_avx512 has not switched them off (gemv.cpp).
bool avx512_enabled();

// out (M, N) float32 = x (M, K) bf16 @ weight (N, K) bf16 ^T; contiguous rows; rows split across torch's threads.
void gemv_bf16_avx512(const at::BFloat16* weight, const at::BFloat16* x, int64_t M, int64_t N, int64_t K, float* out);

// out (M, N) float32 = x (M, K) bf16 @ int4 weights^T (fastllava's layout: codes (N, K/2), w = (q - 8) s + z per
// group; scales/zeros (N, K/group) float32 when float_scales, else bf16); K a multiple of 64 and of group.
void gemv_int4_bf16_avx512(const uint8_t* codes, const void* scales, const void* zeros, bool float_scales,
                           int64_t group, const at::BFloat16* x, int64_t M, int64_t N, int64_t K, float* out);

// The CPU has AVX512F/BW/VL/DQ and AVX512-VNNI (checked once).
bool avx512_vnni_supported();

// out (M, N) float32 = x (M, K) float32 @ (int8 weight (N, K) * scales (N,) float32 or bf16)^T; K a multiple of
// 128; x rounded to two int8 parts per 128 columns (gemv_vnni.cpp). Rows split across threads. `pairs`: the weight is
// in int8_pairs.cpp's pair layout (N even).
void gemv_int8_vnni(const int8_t* weight, const void* scales, bool float_scales, const float* x, int64_t M, int64_t N,
                    int64_t K, float* out, bool pairs = false);

// out (M, N) float32 = x (M, K) float32 @ int4 weights^T (gemv.cpp's layout and formula), K a multiple of 128,
// group 32/64/128/256, scales/zeros float32 (float_scales) or bf16. parts 1: x rounded to int8 per 32 columns
// exactly as gemv_int4_q8's AVX2 loop does; parts 2: x as two int8 parts per 128 columns (below bf16 rounding).
void gemv_int4_vnni(const uint8_t* codes, const void* scales, const void* zeros, bool float_scales, int64_t group,
                    int parts, const float* x, int64_t M, int64_t N, int64_t K, float* out);

}  // namespace fastllava
