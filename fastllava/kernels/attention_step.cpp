// The attention half of a decode layer for one new token per sequence, as one op: RoPE on the new query and key,
// the new key and value written into the cache, attention over the first kv_len cache rows. The same C++ functions
// as the ops rotary_, cache_write_ and decode_attention, in the same order, so results are identical to calling
// those three (tests/test_lean_step.py); what goes is the Python between them.
//
// Why: the decode step's Python (the lean step, fastllava/generation/lean_step.py) spent ~20 us a layer on this
// part outside the kernels (2 rotary_ and 1 cache_write_ dispatches, 3 head views, 2 cache slices, a reshape).
// Measured (llava-interleave-qwen-0.5b, two threads, products stubbed out): 1.80-1.86 -> 1.55-1.56 ms a step, i.e.
// ~0.3 ms of a token, 2-3% of an int4 step.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "decode_ops.h"

namespace {

// q (B, 1, H * D), k/v (B, 1, Hkv * D): the new token's projections (views of one joint product are fine: the last
// dim must be contiguous); keys/values (B, Hkv, L, D) the layer's cache. q and k are rotated in place. Returns the
// attention output (B, 1, H * D) in q's dtype, ready for o_proj.
at::Tensor decode_attention_step(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                 const at::Tensor& sin, at::Tensor& keys, at::Tensor& values, int64_t slot,
                                 int64_t kv_len, const std::optional<at::Tensor>& valid, double scale) {
  TORCH_CHECK(keys.dim() == 4, "fastllava decode_attention_step: the cache must be (B, Hkv, L, D), got ", keys.sizes());
  const int64_t B = keys.size(0), Hkv = keys.size(1), D = keys.size(3);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.size(1) == 1 && q.size(0) == B && D > 0 &&
                  q.size(2) % D == 0 && k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == 1 &&
                  k.size(2) == Hkv * D,
              "fastllava decode_attention_step: q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(),
              " are not one token's (B, 1, heads * ", D, ") projections for a cache of ", keys.sizes());
  TORCH_CHECK(kv_len > slot && kv_len <= keys.size(2), "fastllava decode_attention_step: kv_len ", kv_len,
              " must cover the new slot ", slot, " and fit the cache's ", keys.size(2));
  const int64_t H = q.size(2) / D;
  at::Tensor q_heads = q.view({B, 1, H, D}).transpose(1, 2);  // (B, H, 1, D) views: rotated in place
  at::Tensor k_heads = k.view({B, 1, Hkv, D}).transpose(1, 2);
  const at::Tensor v_heads = v.view({B, 1, Hkv, D}).transpose(1, 2);
  fastllava::rotary_(q_heads, cos, sin);
  fastllava::rotary_(k_heads, cos, sin);
  fastllava::cache_write_(keys, values, k_heads, v_heads, slot);
  const at::Tensor out = fastllava::decode_attention(q_heads.reshape({B, H, D}), keys.narrow(2, 0, kv_len),
                                                     values.narrow(2, 0, kv_len), valid, scale);
  return out.view({B, 1, H * D});
}

}  // namespace

at::Tensor fastllava::decode_attention_step(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                            const at::Tensor& sin, at::Tensor& keys, at::Tensor& values, int64_t slot,
                                            int64_t kv_len, const std::optional<at::Tensor>& valid, double scale) {
  return ::decode_attention_step(q, k, v, cos, sin, keys, values, slot, kv_len, valid, scale);
}

TORCH_LIBRARY_FRAGMENT(fastllava, m) {
  m.def("decode_attention_step(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor cos, Tensor sin, Tensor(c!) keys, "
        "Tensor(d!) values, int slot, int kv_len, Tensor? valid, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastllava, CPU, m) { m.impl("decode_attention_step", &decode_attention_step); }
