// fastllava's decode ops as C++ functions, for ops that chain them without going back through the dispatcher
// (attention_step.cpp). Each is the op of the same name (attention.cpp, pointwise.cpp) with its checks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastllava {

// q (B, H, D), k/v (B, Hkv, S, D) -> (B, H, D) in q's dtype: softmax(scale q k^T) v over the rows valid (B, S) allows.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& valid, double scale);

// x (B, H, S, D) rotated in place by cos/sin (B or 1, S, D) (rotate-half RoPE).
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// keys[:, :, slot:slot + T] = k and values[:, :, slot:slot + T] = v.
void cache_write_(at::Tensor& keys, at::Tensor& values, const at::Tensor& k, const at::Tensor& v, int64_t slot);

}  // namespace fastllava
