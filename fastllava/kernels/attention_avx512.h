// The AVX-512 inner loops of decode attention (attention_avx512.cpp), called by attention.cpp after a runtime CPU
// check (fastllava::avx512_enabled(): AVX512-BF16 present and not switched off).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastllava {

// scores[h * scores_stride + j] = scale * (q_h . key_j) for keys j in [0, n) (rows `stride` elements apart) and
// the G heads of a group; q_pairs (G, D / 2): each head's bf16 query as 32-bit pairs. D a multiple of 32, <= 256.
void bf16_block_scores(const uint32_t* q_pairs, const at::BFloat16* keys, int64_t stride, int64_t n, int64_t D,
                       int64_t G, float scale, float* scores, int64_t scores_stride);

// acc (D floats) += sum over rows i in [0, n) of p[i] * rows[i] (float32 rows D apart), masked rows skipped;
// D a multiple of 16.
void weighted_rows_avx512(const float* p, const float* rows, int64_t n, const bool* valid, int64_t valid_stride,
                          int64_t D, float* acc);

// One query head with its own K/V rows (G = 1): out (D floats) = softmax(scale q.k_j) v over the S rows, in one pass
// that reads each key row and then, 16 keys later at most, the value row (an online softmax). q: D bf16 values,
// D a multiple of 32, <= 256; valid (optional, valid_stride apart): False rows are never read; none valid: zeros.
void bf16_single_head_attention(const at::BFloat16* q, const at::BFloat16* keys, int64_t k_stride,
                                const at::BFloat16* values, int64_t v_stride, int64_t S, int64_t D, const bool* valid,
                                int64_t valid_stride, float scale, float* out);

}  // namespace fastllava
