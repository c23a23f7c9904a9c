// Single-query attention (a decode step): out (B, H, D) = softmax(q k^T * scale) v for one query per sequence
// over S cached keys, K/V in fp32, bf16 or fp16, float32 arithmetic throughout.
//
// Why: on x86 CPUs without bf16 arithmetic (AVX2 only) torch's SDPA of one query over bf16 K/V converts as it
// goes and runs ~7x slower than over fp32 (measured below), which is why bf16 models kept float32 caches: twice
// the KV memory and twice the bytes every decode step reads. Decode attention reads every cached byte once and
// does ~2 FLOPs per byte, so it is a memory stream: here each K/V row is converted 8 values per instruction
// pair while in registers, and a bf16 cache halves the bytes.
//
// Layout: q (B, H, D) any strides, any of fp32/bf16/fp16. k, v (B, Hkv, S, D), same dtype, last dim contiguous,
// other strides free (views into a larger storage: the engine's per-sequence (layers, 2, Hkv, capacity, D)
// tensors, generate()'s preallocated caches). Grouped-query: query head h reads KV head h / (H / Hkv).
// valid: optional (B, S) bool (any strides, stride 0 allowed), True = may attend. Output (B, H, D) in q's dtype;
// a query with no valid key gets zeros, as torch's SDPA gives.
//
// Work: at::parallel_for over (b, kv head) pairs; each pair is one task in one thread (so the result does not
// depend on the thread count). Within a task the G = H / Hkv query heads of the group share every K/V row:
//   1. scores: K is walked in blocks of ~16 KiB (they stay in L1) and every query head of the group takes its dot
//      products with the block, four keys at a time (four independent FMA chains, reduced together by a hadd tree);
//   2. softmax per head: max, exp(s - max) (fastllava::exp8 of vector_math.h, 8 lanes, <= 1 ulp), sum;
//   3. values: V is walked in the same blocks, each head accumulating p * v in up to 8 registers per 64 dims.
// So K and V are each read from memory once per step, whatever G is. q is converted to float32 and scaled once;
// D that is a multiple of 8 runs in whole vectors, any other D adds a scalar tail.
//
// Measured (AVX2 EPYC, one thread, 2 shared cores; benchmarks/bench_engine.py --only decode-attention), one
// layer, 800 cached tokens, caches read cold (a rotation through 256 MB, as a real step reads them) / warm:
//   16/16 heads x 64: this kernel over bf16 0.25 / 0.13 ms, over fp32 0.76 / 0.15 ms; SDPA over fp32 1.01 / 0.22,
//                     over bf16 2.28 / 1.71; the PyTorch single-query path over fp32 1.07 / 0.25.
//   14/2 heads x 64:  this kernel over bf16 0.18 / 0.11, over fp32 0.20 / 0.09; SDPA over fp32 0.38 / 0.18.
// Cold, the times follow the bytes read (bf16 streams at ~13 GB/s); warm, the fixed cost is ~10 us a call.
// On CPUs with AVX512-BF16, bf16 queries over bf16 caches with head sizes that are multiples of 32 take
// attention_avx512.cpp's loops for the scores (16 keys per VDPBF16PS, no horizontal sums) and the value sums
// (16-lane FMAs): 14/2 heads x 64, 760 cached tokens, one thread, warm: 55 us a layer against 78 (set_avx512(False)).
// Heads with their own K/V rows (G = 1: Qwen1.5, LLaMA-2/Vicuna) take one pass instead of three there: per 16 keys
// the scores, a running max and sum (earlier sums rescaled when the max grows) and the value rows, so K and V are
// read as two interleaved streams. Why: a cold cache read as "all of K, then all of V" per head streamed at ~15 GB/s,
// the two streams together at ~23 (a plain C++ read of the same rows in either order: 193-199 vs 122-137 us). 16/16
// heads x 64, 757 tokens, one thread, cold: 133-142 us a layer against 220; inside a real decode step of
// llava-interleave-qwen-0.5b 145-150 us against 189-193 (~1.1 ms a token).
// With it, bf16 caches became the default for bf16 models (half the memory): a 16-sequence engine decode step
// of llava-interleave-qwen-0.5b at ~800 tokens went from 0.632 s (SDPA, fp32 caches) to 0.446 s. See
// fastllava/models/half_matmul.py resolve_kv_dtype for the prefill side of that decision.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "attention_avx512.h"
#include "decode_ops.h"
#include "gemv_avx512.h"
#include "vector_math.h"  // Vec<T> (fp32/bf16/fp16 as 8 floats), exp8 (<= 1 ulp, exp(-inf) = 0), horizontal_sum

namespace {

using fastllava::exp1;
using fastllava::exp8;
using fastllava::horizontal_sum;
template <typename T>
using Load = fastllava::Vec<T>;

// ------------------------------------------------------------------------------------------------ the passes

// Rows are prefetched ~2 KiB ahead of the first head's pass (measured over 192 MB of caches, 16/16 heads x 64,
// 800 tokens, bf16: 0.28-0.33 ms a layer against 0.46 without; 1 KiB was no better, 4 KiB slower).
constexpr int64_t kPrefetchBytes = 2048;

// Software prefetch of rows [s0, s1) (each row_bytes long), one touch per 64-byte line.
template <typename T>
inline void prefetch_rows(const T* base, int64_t stride, int64_t s0, int64_t s1, int64_t row_bytes) {
  for (int64_t s = s0; s < s1; ++s) {
    const char* row = reinterpret_cast<const char*>(base + s * stride);
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
  }
}


// scores[0..4) = q . k_j for the four keys at k, k + stride, ...: four FMA chains, one hadd tree at the end.
template <typename T>
inline void dot4(const float* q, const T* k, int64_t stride, int64_t D, float* scores) {
  const T* k0 = k;
  const T* k1 = k + stride;
  const T* k2 = k + 2 * stride;
  const T* k3 = k + 3 * stride;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    a0 = _mm256_fmadd_ps(Load<T>::load(k0 + d), qv, a0);
    a1 = _mm256_fmadd_ps(Load<T>::load(k1 + d), qv, a1);
    a2 = _mm256_fmadd_ps(Load<T>::load(k2 + d), qv, a2);
    a3 = _mm256_fmadd_ps(Load<T>::load(k3 + d), qv, a3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));  // (a0, a1, a2, a3)
  _mm_storeu_ps(scores, sums);
  for (; d < D; ++d) {
    scores[0] += q[d] * Load<T>::load1(k0 + d);
    scores[1] += q[d] * Load<T>::load1(k1 + d);
    scores[2] += q[d] * Load<T>::load1(k2 + d);
    scores[3] += q[d] * Load<T>::load1(k3 + d);
  }
}

template <typename T>
inline float dot1(const float* q, const T* k, int64_t D) {
  __m256 a = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) a = _mm256_fmadd_ps(Load<T>::load(k + d), _mm256_loadu_ps(q + d), a);
  float sum = horizontal_sum(a);
  for (; d < D; ++d) sum += q[d] * Load<T>::load1(k + d);
  return sum;
}

// acc[0 .. 8*NC) += sum over keys s in [s0, s1) of p[s] * v_s[0 .. 8*NC): NC accumulators stay in registers.
// Prefetching: while the first head passes over a block's rows, the rows `ahead` positions further on (below
// `end`, both counted from the block's first row) are touched, so memory keeps streaming into the next block.
struct Prefetch {
  int64_t ahead = 0, end = 0, row_bytes = 0;
  template <typename T>
  inline void at(const T* rows, int64_t stride, int64_t i) const {
    if (i + ahead < end) prefetch_rows(rows, stride, i + ahead, i + ahead + 1, row_bytes);
  }
};

// scores[i] = q . row_i for rows [0, n) of a block.
template <typename T>
inline void score_block(const float* q, const T* rows, int64_t stride, int64_t n, int64_t D, float* scores,
                        Prefetch pf) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) pf.at(rows, stride, i + j);
    dot4(q, rows + i * stride, stride, D, scores + i);
  }
  for (; i < n; ++i) {
    pf.at(rows, stride, i);
    scores[i] = dot1(q, rows + i * stride, D);
  }
}

// acc[0 .. 8*NC) += sum over rows i in [0, n) of p[i] * row_i[0 .. 8*NC): NC accumulators stay in registers.
template <int NC, typename T>
inline void weighted_rows(const float* p, const T* rows, int64_t stride, int64_t n, const bool* valid,
                          int64_t valid_stride, float* acc, Prefetch pf) {
  __m256 a[NC];
  for (int c = 0; c < NC; ++c) a[c] = _mm256_loadu_ps(acc + 8 * c);
  for (int64_t i = 0; i < n; ++i) {
    pf.at(rows, stride, i);
    if (valid != nullptr && !valid[i * valid_stride]) continue;  // a masked row may hold anything, even NaN
    const __m256 w = _mm256_set1_ps(p[i]);
    const T* row = rows + i * stride;
    for (int c = 0; c < NC; ++c) a[c] = _mm256_fmadd_ps(Load<T>::load(row + 8 * c), w, a[c]);
  }
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(acc + 8 * c, a[c]);
}

// acc (D floats) += sum over rows i in [0, n) of p[i] * row_i: 64 columns per register tile, then the rest.
template <typename T>
inline void weighted_block(const float* p, const T* rows, int64_t stride, int64_t n, const bool* valid,
                           int64_t valid_stride, int64_t D, float* acc, Prefetch pf) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64, pf.end = 0) weighted_rows<8>(p, rows + d, stride, n, valid, valid_stride, acc + d, pf);
  switch ((D - d) / 8) {  // the remaining whole vectors in one more tile
    case 1: weighted_rows<1>(p, rows + d, stride, n, valid, valid_stride, acc + d, pf); break;
    case 2: weighted_rows<2>(p, rows + d, stride, n, valid, valid_stride, acc + d, pf); break;
    case 3: weighted_rows<3>(p, rows + d, stride, n, valid, valid_stride, acc + d, pf); break;
    case 4: weighted_rows<4>(p, rows + d, stride, n, valid, valid_stride, acc + d, pf); break;
    case 5: weighted_rows<5>(p, rows + d, stride, n, valid, valid_stride, acc + d, pf); break;
    case 6: weighted_rows<6>(p, rows + d, stride, n, valid, valid_stride, acc + d, pf); break;
    case 7: weighted_rows<7>(p, rows + d, stride, n, valid, valid_stride, acc + d, pf); break;
    default: break;
  }
  d += (D - d) / 8 * 8;
  for (int64_t i = 0; d < D && i < n; ++i) {  // D % 8 columns
    if (valid != nullptr && !valid[i * valid_stride]) continue;
    const T* row = rows + i * stride;
    for (int64_t c = d; c < D; ++c) acc[c] += p[i] * Load<T>::load1(row + c);
  }
}

// rows [0, n) of a half-precision block -> float32 (n, D), once for all the heads of a group.
template <typename T>
inline void convert_block(const T* rows, int64_t stride, int64_t n, int64_t D, float* out, Prefetch pf) {
  for (int64_t i = 0; i < n; ++i) {
    pf.at(rows, stride, i);
    const T* row = rows + i * stride;
    float* dst = out + i * D;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + d, Load<T>::load(row + d));
    for (; d < D; ++d) dst[d] = Load<T>::load1(row + d);
  }
}

struct Task {
  int64_t S, D, G;
  int64_t k_stride, v_stride;  // between consecutive positions, in elements
  int64_t block;               // keys per block
  int64_t row_bytes;           // D * element size
  int64_t prefetch_rows;       // how far ahead rows are prefetched
  bool convert;                // half-precision K/V shared by several heads: convert each block once
  bool avx512;                 // bf16 K/V, bf16 q, D % 32 == 0: attention_avx512.cpp's loops (q_pairs given)
  float scale;                 // for the AVX-512 scores (q_pairs are unscaled)
};

// One (b, kv head): q (G, D) float32, pre-scaled; out (G, D) float32. scores: G * S floats, rows: block * D floats
// of scratch.
template <typename T>
void attend_group(const Task& t, const float* q, const T* k, const T* v, const bool* valid, int64_t valid_stride,
                  float* scores, float* rows, float* out, const uint32_t* q_pairs) {
  const int64_t S = t.S, D = t.D, G = t.G;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (t.avx512 && G == 1) {  // one pass over K and V together (the q pairs are the query's bf16 values in order)
    if constexpr (std::is_same<T, at::BFloat16>::value)
      fastllava::bf16_single_head_attention(reinterpret_cast<const at::BFloat16*>(q_pairs), k, t.k_stride, v,
                                            t.v_stride, S, D, valid, valid_stride, t.scale, out);
    return;
  }
  // 1. scores, block by block: the block's K rows come from memory once and are reread from L1 by every head
  for (int64_t s0 = 0; s0 < S; s0 += t.block) {
    const int64_t n = std::min(S, s0 + t.block) - s0;
    const Prefetch pf{t.prefetch_rows, S - s0, t.row_bytes};
    const T* block = k + s0 * t.k_stride;
    if (t.avx512) {
      if constexpr (std::is_same<T, at::BFloat16>::value)
        fastllava::bf16_block_scores(q_pairs, block, t.k_stride, n, D, G, t.scale, scores + s0, S);
    } else if (t.convert) {
      convert_block(block, t.k_stride, n, D, rows, pf);
      for (int64_t h = 0; h < G; ++h) score_block(q + h * D, rows, D, n, D, scores + h * S + s0, Prefetch{});
    } else {
      for (int64_t h = 0; h < G; ++h)
        score_block(q + h * D, block, t.k_stride, n, D, scores + h * S + s0, h == 0 ? pf : Prefetch{});
    }
    if (valid != nullptr)
      for (int64_t h = 0; h < G; ++h)
        for (int64_t i = 0; i < n; ++i)
          if (!valid[(s0 + i) * valid_stride]) scores[h * S + s0 + i] = neg_inf;
  }
  // 2. softmax numerators in place; a head whose every key is masked gets zeros
  std::vector<float> inverse_sum(static_cast<size_t>(G));
  for (int64_t h = 0; h < G; ++h) {
    float* sh = scores + h * S;
    __m256 m8 = _mm256_set1_ps(neg_inf);
    int64_t s = 0;
    for (; s + 8 <= S; s += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sh + s));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m8);
    float m = neg_inf;
    for (float lane : lanes) m = std::max(m, lane);
    for (; s < S; ++s) m = std::max(m, sh[s]);
    if (m == neg_inf) {  // nothing to attend to (or S == 0)
      inverse_sum[h] = 0.f;
      continue;
    }
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum8 = _mm256_setzero_ps();
    for (s = 0; s + 8 <= S; s += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sh + s), mv));
      _mm256_storeu_ps(sh + s, e);
      sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = horizontal_sum(sum8);
    for (; s < S; ++s) {
      sh[s] = exp1(sh[s] - m);
      sum += sh[s];
    }
    inverse_sum[h] = 1.f / sum;
  }
  // 3. values, block by block as for the keys
  std::fill(out, out + G * D, 0.f);
  for (int64_t s0 = 0; s0 < S; s0 += t.block) {
    const int64_t n = std::min(S, s0 + t.block) - s0;
    Prefetch pf{t.prefetch_rows, S - s0, t.row_bytes};
    const T* block = v + s0 * t.v_stride;
    const bool* block_valid = valid == nullptr ? nullptr : valid + s0 * valid_stride;
    if (t.convert) {
      convert_block(block, t.v_stride, n, D, rows, pf);
      for (int64_t h = 0; h < G; ++h) {
        if (inverse_sum[h] == 0.f) continue;
        if (t.avx512)
          fastllava::weighted_rows_avx512(scores + h * S + s0, rows, n, block_valid, valid_stride, D, out + h * D);
        else
          weighted_block(scores + h * S + s0, rows, D, n, block_valid, valid_stride, D, out + h * D, Prefetch{});
      }
    } else {
      for (int64_t h = 0; h < G; ++h) {
        if (inverse_sum[h] == 0.f) continue;
        weighted_block(scores + h * S + s0, block, t.v_stride, n, block_valid, valid_stride, D, out + h * D, pf);
        pf = Prefetch{};  // the first head with anything to attend to prefetches
      }
    }
  }
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < D; ++d) out[h * D + d] *= inverse_sum[h];
}

bool supported(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Shapes and dtypes (shared by the CPU and Meta implementations). Returns {B, H, Hkv, S, D}.
std::array<int64_t, 5> check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const std::optional<at::Tensor>& valid) {
  TORCH_CHECK(q.dim() == 3, "fastllava decode_attention: q must be (B, H, D), got ", q.dim(), " dims");
  TORCH_CHECK(k.dim() == 4, "fastllava decode_attention: k must be (B, Hkv, S, D), got ", k.dim(), " dims");
  TORCH_CHECK(v.sizes() == k.sizes(), "fastllava decode_attention: v's shape ", v.sizes(), " differs from k's ",
              k.sizes());
  TORCH_CHECK(supported(q.scalar_type()), "fastllava decode_attention: q must be float32, bfloat16 or float16, got ",
              q.scalar_type());
  TORCH_CHECK(supported(k.scalar_type()), "fastllava decode_attention: k/v must be float32, bfloat16 or float16, got ",
              k.scalar_type());
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "fastllava decode_attention: k is ", k.scalar_type(), " but v is ",
              v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B, "fastllava decode_attention: q has batch ", B, " but k/v have ", k.size(0));
  TORCH_CHECK(k.size(3) == D, "fastllava decode_attention: q's head width ", D, " does not match k/v's ", k.size(3));
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "fastllava decode_attention: ", H,
              " query heads are not a multiple of the ", Hkv, " key/value heads");
  TORCH_CHECK(D == 0 || k.size(3) == 1 || (k.stride(3) == 1 && v.stride(3) == 1),
              "fastllava decode_attention: k and v need a contiguous last dim (got strides ", k.stride(3), ", ",
              v.stride(3), ")");
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool, "fastllava decode_attention: valid must be bool, got ",
                valid->scalar_type());
    TORCH_CHECK(valid->dim() == 2 && valid->size(0) == B && valid->size(1) == S,
                "fastllava decode_attention: valid must be (B, S) = (", B, ", ", S, "), got ", valid->sizes());
  }
  return {B, H, Hkv, S, D};
}

// bf16 K/V and a bf16 query (the products VDPBF16PS computes exactly): attention_avx512.cpp's loops where the CPU
// has them. They read the query's bf16 values, not the float32 copy the other loops use.
bool avx512_loops_apply(const at::Tensor& q, const at::Tensor& k, int64_t D) {
  return k.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kBFloat16 && D % 32 == 0 && D <= 256 &&
         fastllava::avx512_enabled();
}

template <typename T>
void run(const at::Tensor& qf, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& valid,
         at::Tensor& out, int64_t B, int64_t H, int64_t Hkv, int64_t S, int64_t D, const at::Tensor& q,
         double scale) {
  const int64_t G = H / Hkv;
  Task task{S, D, G, k.stride(2), v.stride(2), 0, D * static_cast<int64_t>(sizeof(T)), 0, false, false,
            static_cast<float>(scale)};
  task.avx512 = avx512_loops_apply(q, k, D);
  std::vector<uint32_t> q_pairs(task.avx512 ? static_cast<size_t>(B * H * D / 2) : 0);
  if (task.avx512) {  // (B, H, D / 2): each head's bf16 query as 32-bit pairs, unscaled
    const auto* bits = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
    // strides read once: Tensor::stride() in the loop (a checked call each) was most of a short-cache step's cost
    const int64_t sb = q.stride(0), sh = q.stride(1), sd = q.stride(2);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; d += 2) {
          const int64_t at = b * sb + h * sh + d * sd;
          q_pairs[((b * H + h) * D + d) / 2] = bits[at] | (static_cast<uint32_t>(bits[at + sd]) << 16);
        }
  }
  task.prefetch_rows = kPrefetchBytes / std::max<int64_t>(1, task.row_bytes);
  task.convert = G > 1 && !std::is_same<T, float>::value;
  // ~16 KiB of rows per block (as float32 when converted; a multiple of 4 keys): they stay in L1 while the
  // group's heads pass over them
  const int64_t block_row_bytes = task.convert ? D * 4 : task.row_bytes;
  task.block = std::max<int64_t>(4, (16384 / std::max<int64_t>(1, block_row_bytes)) / 4 * 4);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool* mp = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  const int64_t mb = valid.has_value() ? valid->stride(0) : 0, ms = valid.has_value() ? valid->stride(1) : 0;
  // tasks of at least ~64k multiply-adds each: a short cache is not worth waking another thread for
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, S * D * (G + 1)));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    // the one-pass loop (AVX-512, G = 1) keeps its scores in registers: no G * S floats to zero every call
    std::vector<float> scores(task.avx512 && G == 1 ? 0 : static_cast<size_t>(G * S));
    std::vector<float> rows(task.convert ? static_cast<size_t>(task.block * D) : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      attend_group<T>(task, qp + (b * H + h * G) * D, kp + b * k.stride(0) + h * k.stride(1),
                      vp + b * v.stride(0) + h * v.stride(1), mp == nullptr ? nullptr : mp + b * mb, ms,
                      scores.data(), rows.data(), op + (b * H + h * G) * D,
                      task.avx512 ? q_pairs.data() + (b * H + h * G) * D / 2 : nullptr);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& valid, double scale) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu(), "fastllava decode_attention: tensors must be on the CPU, got ", t->device());
  TORCH_CHECK(!valid.has_value() || valid->device().is_cpu(), "fastllava decode_attention: valid must be on the CPU");
  const auto [B, H, Hkv, S, D] = check_inputs(q, k, v, valid);
  // q as float32 (B, H, D), scaled once: float(q) * float(scale), what q.to(float).mul(scale) computes, without
  // the dispatched ops (this runs once per layer and token)
  at::Tensor qf = at::empty({B, H, D}, q.options().dtype(at::kFloat));
  at::Tensor result = at::empty({B, H, D}, q.options());
  if (B * H * D == 0) return result;
  float* qd = qf.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);
  auto convert_q = [&](auto tag) {
    using T = decltype(tag);
    const T* src = q.data_ptr<T>();
    const int64_t sb = q.stride(0), sh = q.stride(1), sd = q.stride(2);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d)
          qd[(b * H + h) * D + d] = static_cast<float>(src[b * sb + h * sh + d * sd]) * scale_f;
  };
  if (!avx512_loops_apply(q, k, D)) {
    switch (q.scalar_type()) {
      case at::kFloat: convert_q(float{}); break;
      case at::kBFloat16: convert_q(at::BFloat16{}); break;
      default: convert_q(at::Half{}); break;
    }
  }
  at::Tensor out = q.scalar_type() == at::kFloat ? result : at::empty({B, H, D}, q.options().dtype(at::kFloat));
  switch (k.scalar_type()) {
    case at::kFloat: run<float>(qf, k, v, valid, out, B, H, Hkv, S, D, q, scale); break;
    case at::kBFloat16: run<at::BFloat16>(qf, k, v, valid, out, B, H, Hkv, S, D, q, scale); break;
    default: run<at::Half>(qf, k, v, valid, out, B, H, Hkv, S, D, q, scale); break;
  }
  if (q.scalar_type() != at::kFloat) {  // one rounding to q's dtype, round to nearest even as c10 converts
    const float* src = out.data_ptr<float>();
    const int64_t n = B * H * D;
    if (q.scalar_type() == at::kBFloat16) {
      auto* dst = result.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);
    } else {
      auto* dst = result.data_ptr<at::Half>();
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::Half>(src[i]);
    }
  }
  return result;
}

at::Tensor decode_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& valid, double) {
  const auto sizes = check_inputs(q, k, v, valid);
  return at::empty({sizes[0], sizes[1], sizes[4]}, q.options());
}

// The vectorised exp alone, for the tests (float32 in, float32 out).
at::Tensor exp_avx2(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "fastllava exp_avx2: needs a float32 CPU tensor");
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = in.numel();
  at::parallel_for(0, (n + 7) / 8, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * 8; i < std::min(n, end * 8); i += 8) {
      if (i + 8 <= n) {
        _mm256_storeu_ps(dst + i, exp8(_mm256_loadu_ps(src + i)));
      } else {
        for (int64_t j = i; j < n; ++j) dst[j] = exp1(src[j]);
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor fastllava::decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& valid, double scale) {
  return ::decode_attention(q, k, v, valid, scale);
}

TORCH_LIBRARY_FRAGMENT(fastllava, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? valid, float scale) -> Tensor");
  m.def("exp_avx2(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastllava, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("exp_avx2", &exp_avx2);
}

TORCH_LIBRARY_IMPL(fastllava, Meta, m) {
  m.impl("decode_attention", &decode_attention_meta);
}
