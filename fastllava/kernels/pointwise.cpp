// The small per-token operations of a decoder layer, each one pass in C++: RMSNorm, RoPE (in place) and the
// gated SiLU of the MLP.
//
// Why: a decode step spends its time streaming weights (gemv.cpp), but the dozens of tiny PyTorch ops around
// the products each cost a dispatch and an allocation: measured on the llava-interleave-qwen-0.5b text model
// (24 layers, one thread, AVX2 EPYC), a decode step with every matrix product stubbed out still took 22-30 ms
// against ~67 ms of weight streaming. RMSNorm alone is 8 ops in PyTorch (cast, pow, mean, add, rsqrt, mul, cast,
// mul), RoPE 6 per tensor, the gated SiLU 2.
//
// Each op reproduces the rounding of the PyTorch expression it replaces (models/llama.py, models/rope.py): for
// bf16/fp16 every intermediate that PyTorch materialises in that dtype is rounded to it here too (round to
// nearest even, as c10's conversions do); fp32 products and sums are separate operations (this file is built
// with -ffp-contract=off: no fused multiply-add where PyTorch rounds twice). What cannot be reproduced exactly
// is the order of a reduction (RMSNorm's mean of squares) and the last bit of exp (SiLU): fp32 results may
// differ from PyTorch's in the last bit there.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "decode_ops.h"
#include "vector_math.h"

namespace {

using fastllava::exp1;
using fastllava::exp8;
using fastllava::horizontal_sum;
using fastllava::round_to;
using fastllava::Vec;

// Calls body(T{}) with T = float, at::BFloat16 or at::Half for the tensor's dtype (check_float_dtype first).
template <typename Body>
void dispatch_float(at::ScalarType dtype, Body body) {
  if (dtype == at::kFloat) body(float{});
  else if (dtype == at::kBFloat16) body(at::BFloat16{});
  else body(at::Half{});
}

void check_float_dtype(const at::Tensor& t, const char* op, const char* what) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fastllava ", op, ": ", what,
              " must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(t.device().is_cpu(), "fastllava ", op, ": ", what, " must be on the CPU");
}

// ---- RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype), statistics in float32 ----

template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* out, int64_t rows, int64_t width, double eps) {
  using V = Vec<T>;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * width;
      __m256 squares = _mm256_setzero_ps();
      int64_t c = 0;
      for (; c + 8 <= width; c += 8) {
        const __m256 v = V::load(row + c);
        squares = _mm256_fmadd_ps(v, v, squares);
      }
      float sum = horizontal_sum(squares);
      for (; c < width; ++c) sum += V::load1(row + c) * V::load1(row + c);
      const float inverse = 1.f / std::sqrt(sum / static_cast<float>(width) + static_cast<float>(eps));
      const __m256 scale = _mm256_set1_ps(inverse);
      T* target = out + r * width;
      for (c = 0; c + 8 <= width; c += 8) {  // weight * round_T(x * inverse), rounded to T
        const __m256 normed = V::round(_mm256_mul_ps(V::load(row + c), scale));
        V::store(target + c, _mm256_mul_ps(V::load(weight + c), normed));
      }
      for (; c < width; ++c)
        target[c] = static_cast<T>(V::load1(weight + c) * round_to<T>(V::load1(row + c) * inverse));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float_dtype(x, "rms_norm", "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fastllava rms_norm: weight dtype ", weight.scalar_type(),
              " differs from x's ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && x.dim() >= 1 && weight.size(0) == x.size(-1), "fastllava rms_norm: weight of ",
              weight.numel(), " values for rows of ", x.size(-1));
  const at::Tensor input = x.contiguous(), scale = weight.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t width = input.size(-1), rows = width ? input.numel() / width : 0;
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rms_norm_rows<scalar_t>(input.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows,
                            width, eps);
  });
  return out;
}

// ---- RoPE in place: x = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) ----

template <typename T>
void rotate_rows(T* x, const T* cos, const T* sin, int64_t B, int64_t H, int64_t S, int64_t D,
                 const int64_t* strides, int64_t table_batch_stride) {
  using V = Vec<T>;
  const int64_t half = D / 2;
  // first half: x1 cos - x2 sin; second: x2 cos + x1 sin; each product and the sum rounded to T
  auto rotate = [](__m256 first, __m256 second, __m256 c_lo, __m256 s_lo, __m256 c_hi, __m256 s_hi, __m256& low,
                   __m256& high) {
    const __m256 minus_second = _mm256_xor_ps(second, _mm256_set1_ps(-0.f));
    low = V::round(_mm256_add_ps(V::round(_mm256_mul_ps(first, c_lo)), V::round(_mm256_mul_ps(minus_second, s_lo))));
    high = V::round(_mm256_add_ps(V::round(_mm256_mul_ps(second, c_hi)), V::round(_mm256_mul_ps(first, s_hi))));
  };
  at::parallel_for(0, B * H, std::max<int64_t>(1, 256 / std::max<int64_t>(1, S)), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t s = 0; s < S; ++s) {
        T* v = x + b * strides[0] + h * strides[1] + s * strides[2];
        const T* c = cos + b * table_batch_stride + s * D;
        const T* n = sin + b * table_batch_stride + s * D;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
          __m256 low, high;
          rotate(V::load(v + i), V::load(v + i + half), V::load(c + i), V::load(n + i), V::load(c + i + half),
                 V::load(n + i + half), low, high);
          V::store(v + i, low);
          V::store(v + i + half, high);
        }
        for (; i < half; ++i) {
          const float first = V::load1(v + i), second = V::load1(v + i + half);
          const float low = round_to<T>(first * V::load1(c + i)) + round_to<T>(-second * V::load1(n + i));
          const float high = round_to<T>(second * V::load1(c + i + half)) + round_to<T>(first * V::load1(n + i + half));
          v[i] = static_cast<T>(low);
          v[i + half] = static_cast<T>(high);
        }
      }
    }
  });
}

// x (B, H, S, D), any strides but a contiguous last dim (a view of a projection's output); cos/sin (B|1, S, D).
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float_dtype(x, "rotary_", "x");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "fastllava rotary_: x must be (B, H, S, D) with a contiguous last dim");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "fastllava rotary_: cos/sin must have x's dtype ", x.scalar_type());
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "fastllava rotary_: head dim ", D, " is odd");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && (cos.size(0) == B || cos.size(0) == 1) &&
                  cos.size(1) == S && cos.size(2) == D,
              "fastllava rotary_: cos/sin must be (B or 1, S, D) = (", B, ", ", S, ", ", D, "), got ", cos.sizes());
  const at::Tensor c = cos.contiguous(), n = sin.contiguous();
  const int64_t strides[3] = {x.stride(0), x.stride(1), x.stride(2)};
  const int64_t table_batch_stride = c.size(0) == 1 ? 0 : S * D;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rotate_rows<scalar_t>(x.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), n.data_ptr<scalar_t>(), B, H, S, D,
                          strides, table_batch_stride);
  });
}

// ---- gated SiLU: silu(gate) * up, gate/up (M, I) with contiguous rows (e.g. halves of one fused product) ----

template <typename T>
void silu_mul_rows(const T* gate, int64_t gate_stride, const T* up, int64_t up_stride, T* out, int64_t rows,
                   int64_t width) {
  using V = Vec<T>;
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate + r * gate_stride;
      const T* u = up + r * up_stride;
      T* o = out + r * width;
      int64_t c = 0;
      for (; c + 8 <= width; c += 8) {  // silu(g) = g / (1 + exp(-g)), rounded to T, times up, rounded to T
        const __m256 value = V::load(g + c);
        const __m256 activated = V::round(_mm256_div_ps(value, _mm256_add_ps(one, exp8(_mm256_xor_ps(value, sign)))));
        V::store(o + c, _mm256_mul_ps(activated, V::load(u + c)));
      }
      for (; c < width; ++c) {
        const float value = V::load1(g + c);
        o[c] = static_cast<T>(round_to<T>(value / (1.f + exp1(-value))) * V::load1(u + c));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_float_dtype(gate, "silu_mul", "gate");
  TORCH_CHECK(up.scalar_type() == gate.scalar_type(), "fastllava silu_mul: gate and up dtypes differ");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.dim() >= 1, "fastllava silu_mul: gate ", gate.sizes(), " and up ",
              up.sizes(), " differ");
  const int64_t width = gate.size(-1);
  // 2-D row views without copies where the rows are already contiguous (halves of a fused gate/up output)
  auto rows_of = [&](const at::Tensor& t) {
    at::Tensor flat = t.dim() == 2 ? t : t.reshape({-1, width});
    return flat.stride(-1) == 1 ? flat : flat.contiguous();
  };
  const at::Tensor g = rows_of(gate), u = rows_of(up);
  at::Tensor out = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch_float(gate.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    silu_mul_rows<scalar_t>(g.data_ptr<scalar_t>(), g.stride(0), u.data_ptr<scalar_t>(), u.stride(0),
                            out.data_ptr<scalar_t>(), g.size(0), width);
  });
  return out;
}

// ---- argmax over the last dim of (B, V) float32 scores: greedy decoding's choice ----
// torch's CPU argmax reduces one element at a time (131 us over a 151936-word vocabulary, one Zen 4 core); here one
// vector pass that keeps each lane's first maximum. The same answer as torch.argmax: the first index
// of the maximum, and the first NaN if there is one (NaN counts as the largest value).

int64_t argmax_row(const float* row, int64_t n) {
  // One pass: 4 chains of 8 lanes keep each lane's largest value and the first index holding it (a later value
  // replaces it only when strictly greater), then the 32 candidates and the scalar tail are merged, ties going to
  // the smaller index. Measured over a 151936-word row (one Zen 4 core): 71 -> 13 us against a max pass followed
  // by a scalar search for the maximum's first index.
  constexpr int kChains = 4;
  constexpr int64_t kStep = 8 * kChains;
  float maximum = 0.f;
  int64_t index = -1;  // none yet
  bool nan = false;
  int64_t i = 0;
  if (n >= kStep && n <= std::numeric_limits<int32_t>::max()) {  // int32 lane indices
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 best[kChains], unordered = _mm256_setzero_ps();
    __m256i where[kChains];
    for (int c = 0; c < kChains; ++c) {
      best[c] = _mm256_loadu_ps(row + 8 * c);
      where[c] = _mm256_add_epi32(lane, _mm256_set1_epi32(8 * c));
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(best[c], best[c], _CMP_UNORD_Q));
    }
    for (i = kStep; i + kStep <= n; i += kStep) {
      const __m256i base = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(i)));
      for (int c = 0; c < kChains; ++c) {
        const __m256 v = _mm256_loadu_ps(row + i + 8 * c);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        const __m256 greater = _mm256_cmp_ps(v, best[c], _CMP_GT_OQ);
        best[c] = _mm256_blendv_ps(best[c], v, greater);
        where[c] = _mm256_blendv_epi8(where[c], _mm256_add_epi32(base, _mm256_set1_epi32(8 * c)),
                                      _mm256_castps_si256(greater));
      }
    }
    nan = _mm256_movemask_ps(unordered) != 0;
    alignas(32) float values[kStep];
    alignas(32) int32_t indices[kStep];
    for (int c = 0; c < kChains; ++c) {
      _mm256_store_ps(values + 8 * c, best[c]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(indices + 8 * c), where[c]);
    }
    for (int j = 0; j < kStep; ++j)
      if (index < 0 || values[j] > maximum || (values[j] == maximum && indices[j] < index))
        maximum = values[j], index = indices[j];
  }
  for (; i < n; ++i) {  // the tail (or a short row): later indices, so only a strictly greater value wins
    if (std::isnan(row[i])) nan = true;
    else if (index < 0 || row[i] > maximum) maximum = row[i], index = i;
  }
  if (nan)
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(row[j])) return j;
  return index < 0 ? 0 : index;  // index < 0: an all-NaN row returned above; n == 0 is refused by the caller
}

at::Tensor argmax_last(const at::Tensor& scores) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2,
              "fastllava argmax_last: scores must be a 2-D float32 CPU tensor, got ", scores.scalar_type(), " ",
              scores.sizes());
  TORCH_CHECK(scores.size(1) > 0, "fastllava argmax_last: empty rows");
  const at::Tensor rows = scores.stride(1) == 1 ? scores : scores.contiguous();
  at::Tensor out = at::empty({rows.size(0)}, rows.options().dtype(at::kLong));
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows.size(0); ++r) dst[r] = argmax_row(rows.data_ptr<float>() + r * rows.stride(0), rows.size(1));
  return out;
}

// ---- writing new keys/values into a preallocated cache: keys[:, :, slot:slot+T] = k (and values) ----
// One op for both tensors instead of two index_copy_ dispatches (7 us each, 48 a decode step of a 24-layer model).

void cache_write_(at::Tensor& keys, at::Tensor& values, const at::Tensor& k, const at::Tensor& v, int64_t slot) {
  TORCH_CHECK(keys.dim() == 4 && values.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "fastllava cache_write_: caches and new keys/values must be 4-D (B, heads, length, dim)");
  TORCH_CHECK(k.sizes() == v.sizes() && keys.sizes() == values.sizes(), "fastllava cache_write_: shapes differ");
  TORCH_CHECK(k.size(0) == keys.size(0) && k.size(1) == keys.size(1) && k.size(3) == keys.size(3),
              "fastllava cache_write_: new keys ", k.sizes(), " do not fit the cache ", keys.sizes());
  TORCH_CHECK(slot >= 0 && slot + k.size(2) <= keys.size(2), "fastllava cache_write_: positions [", slot, ", ",
              slot + k.size(2), ") are outside the cache's ", keys.size(2));
  const bool rows_copy = k.scalar_type() == keys.scalar_type() && v.scalar_type() == values.scalar_type() &&
                         keys.stride(3) == 1 && values.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1;
  if (!rows_copy) {  // another dtype or strided rows: ATen converts and copies
    keys.narrow(2, slot, k.size(2)).copy_(k);
    values.narrow(2, slot, v.size(2)).copy_(v);
    return;
  }
  // one memcpy per (sequence, head, position) row: the two copy_ dispatches cost ~2 us each, most of the work of
  // a decode step's write (one row per head)
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), row_bytes = k.size(3) * k.element_size();
  auto write = [&](at::Tensor& cache, const at::Tensor& rows) {
    auto* dst = static_cast<char*>(cache.data_ptr());
    const auto* src = static_cast<const char*>(rows.data_ptr());
    const int64_t item = cache.element_size();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < T; ++t)
          std::memcpy(dst + (b * cache.stride(0) + h * cache.stride(1) + (slot + t) * cache.stride(2)) * item,
                      src + (b * rows.stride(0) + h * rows.stride(1) + t * rows.stride(2)) * item,
                      static_cast<size_t>(row_bytes));
  };
  write(keys, k);
  write(values, v);
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor&, double) { return at::empty_like(x); }
void rotary_meta(at::Tensor&, const at::Tensor&, const at::Tensor&) {}
at::Tensor silu_mul_meta(const at::Tensor& gate, const at::Tensor&) { return at::empty(gate.sizes(), gate.options()); }

}  // namespace

at::Tensor fastllava::rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return ::rms_norm(x, weight, eps);
}

at::Tensor fastllava::silu_mul(const at::Tensor& gate, const at::Tensor& up) { return ::silu_mul(gate, up); }

void fastllava::rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) { ::rotary_(x, cos, sin); }

void fastllava::cache_write_(at::Tensor& keys, at::Tensor& values, const at::Tensor& k, const at::Tensor& v,
                             int64_t slot) {
  ::cache_write_(keys, values, k, v, slot);
}

TORCH_LIBRARY_FRAGMENT(fastllava, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("argmax_last(Tensor scores) -> Tensor");
  m.def("cache_write_(Tensor(a!) keys, Tensor(b!) values, Tensor k, Tensor v, int slot) -> ()");
}

TORCH_LIBRARY_IMPL(fastllava, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax_last", &argmax_last);
  m.impl("cache_write_", &cache_write_);
}

TORCH_LIBRARY_IMPL(fastllava, Meta, m) {
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("rotary_", &rotary_meta);
  m.impl("silu_mul", &silu_mul_meta);
}
