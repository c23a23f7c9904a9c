// Prefill attention on CPUs with AVX512-BF16: out = softmax(q k^T * scale) v for many queries at once (a vision
// tower's full attention, a prompt's causal attention), bf16 in and out, float32 accumulation, flash-style (the
// T x S score matrix never exists: keys are taken 64 at a time with a running max and sum per query).
//
// Why: torch 2.13's CPU SDPA (its flash kernel) reached 66 GFLOP/s on SigLIP's attention ([16 heads, 729, 72])
// and 43 GFLOP/s on a causal 757-token Qwen2 prompt (one thread, Zen 4), against ~190 GFLOP/s for a bf16 GEMM on
// the same core, so attention was ~1.5 s of a ~7.6 s time to first token (llava-interleave-qwen-0.5b, one image).
// Here both products are VDPBF16PS, which multiplies bf16 pairs straight from the stored bits:
//   scores: 16 keys per register. K is repacked once per head as [block of 64 keys][dim pair][key][2], so one
//           instruction adds q[2p]*k[2p] + q[2p+1]*k[2p+1] for 16 keys, with the query pair broadcast. Any head
//           size works without padding waste (SigLIP's 72 = 36 pairs).
//   values: 16 output dims per register. V is repacked as [key pair][dim][2]; the bf16 probabilities of one
//           query are already key pairs in memory, so again one broadcast and one instruction per 16 dims.
// Four query rows share every K/V register load. The probabilities are rounded to bf16 before the value product
// (as torch's flash kernel does for bf16); their float32 sum is the softmax denominator. exp is a degree-6
// polynomial after range reduction (relative error ~2e-7), far below bf16's 4e-3.
//
// Masks: none, or causal with the top-left alignment of SDPA's is_causal (query i sees keys j <= i); callers
// with other masks keep SDPA. Layout: q (B, H, T, D), k/v (B, Hkv, S, D), bf16, last dim contiguous, other strides
// free; grouped-query heads (query head h reads K/V head h / (H / Hkv)). The result is (B, H, T, D) as a view of a
// contiguous (B, T, H, D) tensor, which is what the model's output projection wants next (no transpose copy).
//
// Compiled with a target pragma like gemv_avx512.cpp, so the library loads on AVX2-only CPUs; the op refuses to
// run without the instructions (Python checks avx512_active() first).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "gemv_avx512.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,bmi2")

namespace {

constexpr int64_t kBlock = 64;  // keys per block: four registers of 16 scores
constexpr int kRows = 4;        // query rows that share each K/V load
constexpr int kMaxVectors = 5;  // output-dim registers per row in one value pass (4 rows x 5 + 5 loads <= 32 zmm)

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// exp of 16 floats: 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 in two parts, e^r by its degree-6 Taylor
// polynomial (|r| <= 0.35: truncation < 1.3e-7). Inputs below -100 give ~0 (callers pass x - max <= 0).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-100.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline uint32_t pair(const uint16_t* row, int64_t d, int64_t D) {  // (row[d], row[d + 1]) as one 32-bit lane
  const uint32_t lo = d < D ? row[d] : 0, hi = d + 1 < D ? row[d + 1] : 0;
  return lo | (hi << 16);
}

struct Shape {
  int64_t B, H, Hkv, T, S, D;
  int64_t pairs() const { return (D + 1) / 2; }             // dim pairs of one key
  int64_t vectors() const { return (D + 15) / 16; }         // 16-dim output registers of one query
  int64_t blocks() const { return (S + kBlock - 1) / kBlock; }
};

// K of one head -> [block][dim pair][64 keys] of 32-bit bf16 pairs, zero past S and D.
void pack_keys(const uint16_t* k, int64_t stride, const Shape& s, uint32_t* out) {
  const int64_t P = s.pairs();
  for (int64_t blk = 0; blk < s.blocks(); ++blk)
    for (int64_t j = 0; j < kBlock; ++j) {
      const int64_t key = blk * kBlock + j;
      uint32_t* dst = out + blk * P * kBlock + j;
      if (key < s.S) {
        const uint16_t* row = k + key * stride;
        for (int64_t p = 0; p < P; ++p) dst[p * kBlock] = pair(row, 2 * p, s.D);
      } else {
        for (int64_t p = 0; p < P; ++p) dst[p * kBlock] = 0;
      }
    }
}

// V of one head -> [key pair][16 * vectors() dims] of 32-bit (v[2j][d], v[2j + 1][d]), zero past S and D.
void pack_values(const uint16_t* v, int64_t stride, const Shape& s, uint32_t* out) {
  const int64_t width = 16 * s.vectors();
  for (int64_t jp = 0; jp < s.blocks() * kBlock / 2; ++jp) {
    const int64_t j0 = 2 * jp, j1 = 2 * jp + 1;
    uint32_t* dst = out + jp * width;
    for (int64_t d = 0; d < width; ++d) {
      const uint32_t lo = (j0 < s.S && d < s.D) ? v[j0 * stride + d] : 0;
      const uint32_t hi = (j1 < s.S && d < s.D) ? v[j1 * stride + d] : 0;
      dst[d] = lo | (hi << 16);
    }
  }
}

// o[r][0..NV) (float32, in memory) = o * alpha[r] + sum over key pairs of p[r][pair] * v[pair][dims of the pass]
template <int NV>
inline void value_pass(const uint32_t* vp, int64_t width, int64_t pairs, const uint32_t* probs, int rows,
                       const float* alpha, float* o, int64_t o_stride) {
  __m512 acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c)
      acc[r][c] = r < rows ? _mm512_mul_ps(_mm512_loadu_ps(o + r * o_stride + 16 * c), _mm512_set1_ps(alpha[r]))
                           : _mm512_setzero_ps();
  for (int64_t jp = 0; jp < pairs; ++jp) {
    __m512i vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_si512(vp + jp * width + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      const __m512i pb = _mm512_set1_epi32(static_cast<int>(probs[r * (kBlock / 2) + jp]));
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(pb), as_bh(vv[c]));
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * o_stride + 16 * c, acc[r][c]);
}

void value_dispatch(int nv, const uint32_t* vp, int64_t width, int64_t pairs, const uint32_t* probs, int rows,
                    const float* alpha, float* o, int64_t o_stride) {
  switch (nv) {
    case 1: value_pass<1>(vp, width, pairs, probs, rows, alpha, o, o_stride); break;
    case 2: value_pass<2>(vp, width, pairs, probs, rows, alpha, o, o_stride); break;
    case 3: value_pass<3>(vp, width, pairs, probs, rows, alpha, o, o_stride); break;
    case 4: value_pass<4>(vp, width, pairs, probs, rows, alpha, o, o_stride); break;
    default: value_pass<5>(vp, width, pairs, probs, rows, alpha, o, o_stride); break;
  }
}

// Query rows [r0, r0 + rows) of one head against its packed K/V; writes bf16 rows of out (stride out_stride).
void attend_rows(const uint16_t* q, int64_t q_stride, int rows, int64_t r0, const uint32_t* kp, const uint32_t* vp,
                 const Shape& s, bool causal, float scale, uint16_t* out, int64_t out_stride,
                 std::vector<uint32_t>& qs, std::vector<float>& o) {
  const int64_t P = s.pairs(), NV = s.vectors(), width = 16 * NV;
  for (int r = 0; r < rows; ++r)
    for (int64_t p = 0; p < P; ++p) qs[r * P + p] = pair(q + (r0 + r) * q_stride, 2 * p, s.D);
  std::fill(o.begin(), o.end(), 0.f);
  float m[kRows], l[kRows], alpha[kRows];
  for (int r = 0; r < kRows; ++r) m[r] = -std::numeric_limits<float>::infinity(), l[r] = 0.f, alpha[r] = 1.f;
  alignas(64) uint32_t probs[kRows * kBlock / 2];
  const int64_t last_key = causal ? std::min(s.S - 1, r0 + rows - 1) : s.S - 1;  // the block's furthest key
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t blk = 0; blk * kBlock <= last_key; ++blk) {
    __m512 acc[kRows][4];
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    const uint32_t* kb = kp + blk * P * kBlock;
    for (int64_t p = 0; p < P; ++p) {
      __m512i kv[4];
      for (int c = 0; c < 4; ++c) kv[c] = _mm512_loadu_si512(kb + p * kBlock + 16 * c);
      for (int r = 0; r < kRows; ++r) {
        const __m512i qb = _mm512_set1_epi32(static_cast<int>(qs[r * P + p]));
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(qb), as_bh(kv[c]));
      }
    }
    int64_t keys_used = 0;  // keys of this block any row may see (the value pass stops there)
    for (int r = 0; r < rows; ++r) {
      const int64_t limit = causal ? std::min(s.S - 1, r0 + r) : s.S - 1;
      const int64_t visible = std::min<int64_t>(kBlock, limit - blk * kBlock + 1);  // >= 1: key blk*64 <= limit
      keys_used = std::max(keys_used, visible);
      __m512 x[4];
      __m512 block_max = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int c = 0; c < 4; ++c) {
        const int64_t n = std::clamp<int64_t>(visible - 16 * c, 0, 16);
        const __mmask16 keep = static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(n)));
        x[c] = _mm512_mask_mul_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), keep, acc[r][c], scale_v);
        block_max = _mm512_max_ps(block_max, x[c]);
      }
      const float new_max = std::max(m[r], _mm512_reduce_max_ps(block_max));
      alpha[r] = std::exp(m[r] - new_max);  // exp(-inf) = 0 on the first block
      m[r] = new_max;
      const __m512 max_v = _mm512_set1_ps(new_max);
      __m512 sum = _mm512_setzero_ps();
      __m512 e[4];
      for (int c = 0; c < 4; ++c) {
        const int64_t n = std::clamp<int64_t>(visible - 16 * c, 0, 16);
        const __mmask16 keep = static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(n)));
        e[c] = _mm512_maskz_mov_ps(keep, exp16(_mm512_sub_ps(x[c], max_v)));
        sum = _mm512_add_ps(sum, e[c]);
      }
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
      __m512i lo = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e[1], e[0]));
      __m512i hi = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e[3], e[2]));
      _mm512_store_si512(probs + r * (kBlock / 2), lo);
      _mm512_store_si512(probs + r * (kBlock / 2) + 16, hi);
    }
    const int64_t pairs = (keys_used + 1) / 2;
    const uint32_t* vb = vp + blk * (kBlock / 2) * width;
    for (int64_t c0 = 0; c0 < NV; c0 += kMaxVectors) {
      const int nv = static_cast<int>(std::min<int64_t>(kMaxVectors, NV - c0));
      value_dispatch(nv, vb + 16 * c0, width, pairs, probs, rows, alpha, o.data() + 16 * c0, width);
    }
  }
  const int64_t full = s.D / 16, tail = s.D % 16;
  for (int r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    uint16_t* dst = out + (r0 + r) * out_stride;
    for (int64_t c = 0; c <= full; ++c) {
      if (c == full && tail == 0) break;
      const __m256i bits = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o.data() + r * width + 16 * c), inv)));
      if (c < full)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c), bits);
      else
        _mm256_mask_storeu_epi16(dst + 16 * c, static_cast<__mmask16>(_bzhi_u32(0xffffu, static_cast<unsigned>(tail))), bits);
    }
  }
}

void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, float scale, at::Tensor& out,
         const Shape& s) {
  const int64_t P = s.pairs(), width = 16 * s.vectors(), G = s.H / s.Hkv;
  const int64_t k_head = s.blocks() * P * kBlock, v_head = s.blocks() * (kBlock / 2) * width;
  std::vector<uint32_t> kpack(static_cast<size_t>(s.B * s.Hkv * k_head));
  std::vector<uint32_t> vpack(static_cast<size_t>(s.B * s.Hkv * v_head));
  const auto* kd = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / s.Hkv, h = i % s.Hkv;
      pack_keys(kd + b * k.stride(0) + h * k.stride(1), k.stride(2), s, kpack.data() + i * k_head);
      pack_values(vd + b * v.stride(0) + h * v.stride(1), v.stride(2), s, vpack.data() + i * v_head);
    }
  });
  const auto* qd = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  auto* od = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());  // (B, T, H, D) contiguous
  const int64_t row_groups = (s.T + kRows - 1) / kRows;
  at::parallel_for(0, s.B * s.H * row_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> qs(static_cast<size_t>(kRows * P));
    std::vector<float> o(static_cast<size_t>(kRows * width));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i % row_groups, h = (i / row_groups) % s.H, b = i / (row_groups * s.H);
      const int64_t r0 = g * kRows;
      const int rows = static_cast<int>(std::min<int64_t>(kRows, s.T - r0));
      const int64_t kv = b * s.Hkv + h / G;
      attend_rows(qd + b * q.stride(0) + h * q.stride(1), q.stride(2), rows, r0, kpack.data() + kv * k_head,
                  vpack.data() + kv * v_head, s, causal, scale, od + b * s.T * s.H * s.D + h * s.D, s.H * s.D, qs, o);
    }
  });
}

}  // namespace

#pragma GCC pop_options

namespace {

Shape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, "fastllava prefill_attention: q, k and v must be bfloat16, got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 4, "fastllava prefill_attention: q, k and v must be 4-D (B, heads, length, dim), got ",
                t->sizes());
    TORCH_CHECK(t->stride(3) == 1, "fastllava prefill_attention: the last dim must be contiguous");
  }
  const Shape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B && v.size(1) == s.Hkv && v.size(2) == s.S && k.size(3) == s.D &&
                  v.size(3) == s.D, "fastllava prefill_attention: k ", k.sizes(), " and v ", v.sizes(),
              " do not match q ", q.sizes());
  TORCH_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, "fastllava prefill_attention: ", s.H, " query heads are not a multiple of ",
              s.Hkv, " key/value heads");
  TORCH_CHECK(!causal || s.T <= s.S, "fastllava prefill_attention: causal needs at most as many queries as keys");
  return s;
}

at::Tensor empty_output(const at::Tensor& q, const Shape& s) {  // (B, H, T, D) view of a (B, T, H, D) tensor
  return at::empty({s.B, s.T, s.H, s.D}, q.options()).permute({0, 2, 1, 3});
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu(), "fastllava prefill_attention: tensors must be on the CPU, got ", t->device());
  const Shape s = check_inputs(q, k, v, causal);
  TORCH_CHECK(fastllava::avx512_bf16_supported(), "fastllava prefill_attention: this CPU lacks AVX512-BF16");
  at::Tensor out = empty_output(q, s);
  if (s.B * s.H * s.T == 0) return out;
  if (s.S == 0) return out.zero_();  // no key to attend to: zeros, as SDPA gives
  run(q, k, v, causal, static_cast<float>(scale), out, s);
  return out;
}

at::Tensor prefill_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double) {
  return empty_output(q, check_inputs(q, k, v, causal));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastllava, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastllava, CPU, m) { m.impl("prefill_attention", &prefill_attention); }

TORCH_LIBRARY_IMPL(fastllava, Meta, m) { m.impl("prefill_attention", &prefill_attention_meta); }
