// fastllava's decode ops as C++ functions, for ops that chain them without going back through the dispatcher
// (attention_step.cpp, decoder_layers.cpp). Each is the op of the same name (gemv.cpp, attention.cpp,
// pointwise.cpp, attention_step.cpp) with its checks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastllava {

// q (B, H, D), k/v (B, Hkv, S, D) -> (B, H, D) in q's dtype: softmax(scale q k^T) v over the rows valid (B, S) allows.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& valid, double scale);

// Few-row products y (..., N) = x (..., K) @ W^T (+ bias) in x's dtype: half-precision W (gemv), int8 W with
// per-row scales (gemv_int8), int4 codes with group scales and zeros (gemv_int4: two-part int8 activations,
// gemv_int4_q8: one-part).
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias);
// gemv_int8 over a weight in the pair layout (int8_pairs.cpp).
at::Tensor gemv_int8_pairs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias);
// int8 weight (N, K) rearranged in place into the pair layout (to_pairs) or back to rows.
void int8_pairs_(at::Tensor& weight, bool to_pairs);
// Rows `ids` of a pair-layout int8 weight, row-major (*ids.shape, K).
at::Tensor int8_pair_rows(const at::Tensor& weight, const at::Tensor& ids);
at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                     int64_t group, const std::optional<at::Tensor>& bias);
at::Tensor gemv_int4_q8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t group, const std::optional<at::Tensor>& bias);

// weight * (x * rsqrt(mean(x^2) + eps)), statistics in float32, PyTorch's roundings.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// silu(gate) * up, rounded as PyTorch rounds the two ops.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);

// x (B, H, S, D) rotated in place by cos/sin (B or 1, S, D) (rotate-half RoPE).
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// keys[:, :, slot:slot + T] = k and values[:, :, slot:slot + T] = v.
void cache_write_(at::Tensor& keys, at::Tensor& values, const at::Tensor& k, const at::Tensor& v, int64_t slot);

// RoPE on one new token's q (B, 1, H * D) and k (in place), k/v written at `slot` of keys/values (B, Hkv, L, D),
// attention over the first kv_len rows -> (B, 1, H * D) in q's dtype.
at::Tensor decode_attention_step(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                 const at::Tensor& sin, at::Tensor& keys, at::Tensor& values, int64_t slot,
                                 int64_t kv_len, const std::optional<at::Tensor>& valid, double scale);

}  // namespace fastllava
