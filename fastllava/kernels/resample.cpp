// Pillow-exact 8-bit resampling (PIL.Image.resize with the convolution filters BOX, BILINEAR, HAMMING, BICUBIC,
// LANCZOS) of a window of the output, optionally mapped through a per-channel 256-entry float table
// (rescale + normalize) straight into a (C, H, W) float32 tensor.
//
// Exactness: Pillow's result is, per pass, clip8((2^21 + sum_t k[t] * x[t]) >> 22) with integer coefficients k
// (|k| < 2^23, computed in double and rounded by Pillow's own rule: the Python side computes them, see
// fastllava/pil_resample.py, and hands them here) and 8-bit inputs x, the first pass's result rounded to uint8
// before the second pass reads it. Every product and every partial sum fits in an int32 (255 * sum|k| < 2^31 for
// these filters), so int32 SIMD lanes give exactly the same integers as Pillow's scalar int loop, in any order.
//
// Layout: the source is (H, W, P) uint8 with pixels P bytes apart (P = 3 for packed RGB, 4 for Pillow's own RGBX
// memory, 1 for a plane) of which the first C channels are used; row stride arbitrary.
//
// Vertical pass: for one output row, every byte of the window is the same dot product over the tap rows, so it
// runs 32 bytes at a time (4 x 8 int32 lanes), channels need no special care.
// Horizontal pass: 8 source rows are transposed (8x8 byte blocks, SSE unpacks) so that one 8-byte load holds the
// same byte of 8 rows; a tap then is one widening load, one multiply and one add for 8 rows, with the coefficient
// broadcast; the 8-row results are transposed back.
//
// Threads: with parallel=False (the image processor's batches: one image per worker thread, the GIL is released
// while a torch op runs) the op stays in the calling thread; with parallel=True (one image alone) both passes and
// the value mapping split their rows across at::get_num_threads() threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <thread>
#include <vector>

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);

// One axis of the window: for output i (0-based within the window), row i of a (n, 2 + ksize) int32 tensor holds
// [first input index (absolute), tap count, k_0 .. k_{ksize-1}].
struct Axis {
  const int32_t* data = nullptr;
  int64_t n = 0;
  int64_t stride = 0;
  inline int32_t start(int64_t i) const { return data[i * stride]; }
  inline int32_t count(int64_t i) const { return data[i * stride + 1]; }
  inline const int32_t* k(int64_t i) const { return data + i * stride + 2; }
  int32_t lo() const {
    int32_t v = start(0);
    for (int64_t i = 1; i < n; ++i) v = std::min(v, start(i));
    return v;
  }
  int32_t hi() const {
    int32_t v = start(0) + count(0);
    for (int64_t i = 1; i < n; ++i) v = std::max(v, start(i) + count(i));
    return v;
  }
};

inline uint8_t clip8(int32_t sum) {
  int32_t v = sum >> kPrecisionBits;  // arithmetic shift, as Pillow's (int) >> PRECISION_BITS
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

inline __m256i widen8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// 8 int32 sums -> 8 clipped bytes
inline void store8(uint8_t* out, __m256i acc) {
  acc = _mm256_srai_epi32(acc, kPrecisionBits);
  __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(words, words));
}

// 4 x 8 int32 sums (bytes 0-7, 8-15, 16-23, 24-31) -> 32 clipped bytes
inline void store32(uint8_t* out, __m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  a0 = _mm256_srai_epi32(a0, kPrecisionBits);
  a1 = _mm256_srai_epi32(a1, kPrecisionBits);
  a2 = _mm256_srai_epi32(a2, kPrecisionBits);
  a3 = _mm256_srai_epi32(a3, kPrecisionBits);
  __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(a0, a1), _mm256_packs_epi32(a2, a3));
  bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bytes);
}

// dst[i][j] = src[j][i] for an 8x8 block of bytes.
inline void transpose8x8(const uint8_t* const* src, uint8_t* const* dst) {
  __m128i a0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src[0]));
  __m128i a1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src[1]));
  __m128i a2 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src[2]));
  __m128i a3 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src[3]));
  __m128i a4 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src[4]));
  __m128i a5 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src[5]));
  __m128i a6 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src[6]));
  __m128i a7 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src[7]));
  __m128i b0 = _mm_unpacklo_epi8(a0, a1), b1 = _mm_unpacklo_epi8(a2, a3);
  __m128i b2 = _mm_unpacklo_epi8(a4, a5), b3 = _mm_unpacklo_epi8(a6, a7);
  __m128i c0 = _mm_unpacklo_epi16(b0, b1), c1 = _mm_unpackhi_epi16(b0, b1);
  __m128i c2 = _mm_unpacklo_epi16(b2, b3), c3 = _mm_unpackhi_epi16(b2, b3);
  __m128i d0 = _mm_unpacklo_epi32(c0, c2), d1 = _mm_unpackhi_epi32(c0, c2);
  __m128i d2 = _mm_unpacklo_epi32(c1, c3), d3 = _mm_unpackhi_epi32(c1, c3);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst[0]), d0);
  _mm_storeh_pd(reinterpret_cast<double*>(dst[1]), _mm_castsi128_pd(d0));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst[2]), d1);
  _mm_storeh_pd(reinterpret_cast<double*>(dst[3]), _mm_castsi128_pd(d1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst[4]), d2);
  _mm_storeh_pd(reinterpret_cast<double*>(dst[5]), _mm_castsi128_pd(d2));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst[6]), d3);
  _mm_storeh_pd(reinterpret_cast<double*>(dst[7]), _mm_castsi128_pd(d3));
}

// f(begin, end) over [0, n): split into at::get_num_threads() parts when `parallel` (a single image), else in the
// calling thread (the image processor's workers each run one image). The parts run on std::threads: at::parallel_for
// compiled into an extension without -fopenmp (build.py's flags) runs serially, its OpenMP path being inline code.
template <typename F>
void for_range(int64_t n, int64_t grain, bool parallel, const F& f) {
  if (n <= 0) return;
  const int64_t parts = parallel ? std::min<int64_t>(at::get_num_threads(), n / std::max<int64_t>(grain, 1)) : 1;
  if (parts <= 1) {
    f(0, n);
    return;
  }
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(parts));
  auto part = [&](int64_t i) {
    try {
      f(n * i / parts, n * (i + 1) / parts);
    } catch (...) {
      errors[static_cast<size_t>(i)] = std::current_exception();
    }
  };
  for (int64_t i = 1; i < parts; ++i) threads.emplace_back(part, i);
  part(0);
  for (auto& thread : threads) thread.join();
  for (auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

// Vertical pass over `nbytes` bytes per row. src points at the row of absolute index row0; output row i of the
// axis goes to dst + i * dst_stride.
void vertical_pass(const uint8_t* src, int64_t src_stride, int64_t row0, int64_t nbytes, const Axis& axis,
                   uint8_t* dst, int64_t dst_stride, bool parallel) {
  for_range(axis.n, 16, parallel, [&](int64_t o_begin, int64_t o_end) {
    for (int64_t o = o_begin; o < o_end; ++o) {
      const uint8_t* base = src + (axis.start(o) - row0) * src_stride;
      const int n = axis.count(o);
      const int32_t* k = axis.k(o);
      uint8_t* out = dst + o * dst_stride;
      int64_t b = 0;
      for (; b + 32 <= nbytes; b += 32) {
        __m256i a0 = _mm256_set1_epi32(kHalf), a1 = a0, a2 = a0, a3 = a0;
        const uint8_t* p = base + b;
        for (int t = 0; t < n; ++t, p += src_stride) {
          const __m256i kk = _mm256_set1_epi32(k[t]);
          a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(widen8(p), kk));
          a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(widen8(p + 8), kk));
          a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(widen8(p + 16), kk));
          a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(widen8(p + 24), kk));
        }
        store32(out + b, a0, a1, a2, a3);
      }
      for (; b + 8 <= nbytes; b += 8) {
        __m256i a0 = _mm256_set1_epi32(kHalf);
        const uint8_t* p = base + b;
        for (int t = 0; t < n; ++t, p += src_stride) {
          a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(widen8(p), _mm256_set1_epi32(k[t])));
        }
        store8(out + b, a0);
      }
      for (; b < nbytes; ++b) {
        int32_t sum = kHalf;
        const uint8_t* p = base + b;
        for (int t = 0; t < n; ++t, p += src_stride) sum += static_cast<int32_t>(*p) * k[t];
        out[b] = clip8(sum);
      }
    }
  });
}

// The taps of one block: acc[c] (8 rows) for output o, channels c < C, from the transposed source T.
template <int C>
inline void horizontal_taps(const uint8_t* T, int64_t first, int pixel, int n, const int32_t* k, uint8_t* out) {
  __m256i acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_set1_epi32(kHalf);
  const uint8_t* p = T + first * 8;
  for (int t = 0; t < n; ++t, p += pixel * 8) {
    const __m256i kk = _mm256_set1_epi32(k[t]);
    for (int c = 0; c < C; ++c) acc[c] = _mm256_add_epi32(acc[c], _mm256_mullo_epi32(widen8(p + c * 8), kk));
  }
  for (int c = 0; c < C; ++c) store8(out + c * 8, acc[c]);
}

inline void horizontal_taps_any(const uint8_t* T, int64_t first, int pixel, int channels, int n, const int32_t* k,
                                uint8_t* out) {
  for (int c = 0; c < channels; ++c) {
    __m256i acc = _mm256_set1_epi32(kHalf);
    const uint8_t* p = T + (first + c) * 8;
    for (int t = 0; t < n; ++t, p += pixel * 8) {
      acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(widen8(p), _mm256_set1_epi32(k[t])));
    }
    store8(out + c * 8, acc);
  }
}

// Horizontal pass of `nrows` rows. src row r starts at src + r * src_stride and its pixel 0 has absolute column
// index col0, pixels `pixel` bytes apart; output row r (axis.n pixels of `channels` bytes) goes to
// dst + r * dst_stride.
void horizontal_pass(const uint8_t* src, int64_t src_stride, int pixel, int channels, int64_t col0, int64_t nrows,
                     const Axis& axis, uint8_t* dst, int64_t dst_stride, bool parallel) {
  const int32_t xlo = axis.lo(), xhi = axis.hi();
  const int64_t in_bytes = static_cast<int64_t>(xhi - xlo) * pixel;
  const int64_t out_bytes = axis.n * channels;
  for_range((nrows + 7) / 8, 4, parallel, [&](int64_t block_begin, int64_t block_end) {
    std::vector<uint8_t> transposed(static_cast<size_t>(in_bytes) * 8 + 64);
    std::vector<uint8_t> results(static_cast<size_t>(out_bytes) * 8 + 64);
    std::vector<uint8_t> scratch(static_cast<size_t>(out_bytes) + 64);
    uint8_t* T = transposed.data();
    uint8_t* R = results.data();
    const uint8_t* rows[8];
    uint8_t* outs[8];
    const uint8_t* srcs[8];
    uint8_t* dsts[8];
    for (int64_t r0 = block_begin * 8; r0 < std::min(nrows, block_end * 8); r0 += 8) {
      const int64_t valid = std::min<int64_t>(8, nrows - r0);
      for (int i = 0; i < 8; ++i) {
        const int64_t r = r0 + std::min<int64_t>(i, valid - 1);  // past the end: repeat the last row (discarded)
        rows[i] = src + r * src_stride + (xlo - col0) * pixel;
        outs[i] = i < valid ? dst + (r0 + i) * dst_stride : scratch.data();
      }
      // source bytes -> T[b * 8 + row]
      int64_t b = 0;
      for (; b + 8 <= in_bytes; b += 8) {
        for (int i = 0; i < 8; ++i) {
          srcs[i] = rows[i] + b;
          dsts[i] = T + (b + i) * 8;
        }
        transpose8x8(srcs, dsts);
      }
      for (; b < in_bytes; ++b) {
        for (int i = 0; i < 8; ++i) T[b * 8 + i] = rows[i][b];
      }
      // taps -> R[(o * channels + c) * 8 + row]
      for (int64_t o = 0; o < axis.n; ++o) {
        const int64_t first = static_cast<int64_t>(axis.start(o) - xlo) * pixel;
        uint8_t* out = R + o * channels * 8;
        if (channels == 3) {
          horizontal_taps<3>(T, first, pixel, axis.count(o), axis.k(o), out);
        } else if (channels == 1) {
          horizontal_taps<1>(T, first, pixel, axis.count(o), axis.k(o), out);
        } else {
          horizontal_taps_any(T, first, pixel, channels, axis.count(o), axis.k(o), out);
        }
      }
      // R -> output rows
      b = 0;
      for (; b + 8 <= out_bytes; b += 8) {
        for (int i = 0; i < 8; ++i) {
          srcs[i] = R + (b + i) * 8;
          dsts[i] = outs[i] + b;
        }
        transpose8x8(srcs, dsts);
      }
      for (; b < out_bytes; ++b) {
        for (int i = 0; i < 8; ++i) outs[i][b] = R[b * 8 + i];
      }
    }
  });
}

Axis axis_of(const std::optional<at::Tensor>& coef, int64_t expected, const char* name) {
  Axis axis;
  if (!coef.has_value()) return axis;
  const at::Tensor& t = *coef;
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 2 && t.is_contiguous() && t.size(1) >= 3,
              name, ": expected a contiguous (n, 2 + ksize) int32 tensor");
  TORCH_CHECK(t.size(0) == expected, name, ": ", t.size(0), " outputs, expected ", expected);
  axis.data = t.data_ptr<int32_t>();
  axis.n = t.size(0);
  axis.stride = t.size(1);
  for (int64_t i = 0; i < axis.n; ++i) {
    TORCH_CHECK(axis.count(i) >= 1 && axis.count(i) <= axis.stride - 2, name, ": bad tap count");
  }
  return axis;
}

// resample_window: the window [top, top + rows) x [left, left + cols) of Pillow's resize of src (H, W, P) uint8,
// channels 0..C-1. ycoef / xcoef: that window's taps per axis (None: the axis is not resized, Pillow skips its
// pass). vertical_first: Pillow's pass order. out: uint8 (rows, cols, C) when table is None; else float32
// (C, OH, OW) receiving table[c][value] at [c, dy + y, dx + x].
void resample_window(const at::Tensor& src, int64_t channels, const std::optional<at::Tensor>& ycoef, int64_t top,
                     int64_t rows, const std::optional<at::Tensor>& xcoef, int64_t left, int64_t cols,
                     bool vertical_first, const at::Tensor& out, const std::optional<at::Tensor>& table, int64_t dy,
                     int64_t dx, bool parallel) {
  TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kByte && src.dim() == 3,
              "resample_window: src must be a CPU uint8 (H, W, P) tensor");
  const int64_t H = src.size(0), W = src.size(1), P = src.size(2);
  TORCH_CHECK(src.stride(2) == 1 && src.stride(1) == P, "resample_window: src pixels must be contiguous");
  TORCH_CHECK(channels >= 1 && channels <= P, "resample_window: channels must be in 1..P");
  TORCH_CHECK(rows >= 1 && cols >= 1, "resample_window: empty window");
  const Axis ya = axis_of(ycoef, rows, "ycoef"), xa = axis_of(xcoef, cols, "xcoef");
  if (ya.data) {
    TORCH_CHECK(ya.lo() >= 0 && ya.hi() <= H, "ycoef: taps outside the image");
  } else {
    TORCH_CHECK(top >= 0 && top + rows <= H, "resample_window: rows outside the image");
  }
  if (xa.data) {
    TORCH_CHECK(xa.lo() >= 0 && xa.hi() <= W, "xcoef: taps outside the image");
  } else {
    TORCH_CHECK(left >= 0 && left + cols <= W, "resample_window: columns outside the image");
  }
  const float* tab = nullptr;
  if (table.has_value()) {
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->dim() == 2 &&
                table->size(0) == channels && table->size(1) == 256, "resample_window: table must be (C, 256) float32");
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 3 && out.size(0) == channels &&
                out.stride(2) == 1 && dy >= 0 && dx >= 0 && dy + rows <= out.size(1) && dx + cols <= out.size(2),
                "resample_window: out must be a float32 (C, OH, OW) tensor holding the window at (dy, dx)");
    tab = table->data_ptr<float>();
  } else {
    TORCH_CHECK(out.scalar_type() == at::kByte && out.dim() == 3 && out.size(0) == rows && out.size(1) == cols &&
                out.size(2) == channels && out.is_contiguous(), "resample_window: out must be uint8 (rows, cols, C)");
  }

  if (parallel) {  // threads cost tens of microseconds to start: only for images with ~1 ms of taps or more
    const int64_t ytaps = ya.data ? ya.stride - 2 : 1, xtaps = xa.data ? xa.stride - 2 : 1;
    const int64_t in_rows = ya.data ? ya.hi() - ya.lo() : rows;
    parallel = (in_rows * cols * xtaps + rows * cols * ytaps) * channels >= (int64_t{1} << 22);
  }
  const uint8_t* base = src.data_ptr<uint8_t>();
  const int64_t rs = src.stride(0);
  const int C = static_cast<int>(channels), Pi = static_cast<int>(P);
  std::vector<uint8_t> first, second;
  // the window's bytes: row y, column x, channel c at win[y * wstride + x * wpixel + c]
  const uint8_t* win = nullptr;
  int64_t wstride = 0, wpixel = 0;
  if (!ya.data && !xa.data) {
    win = base + top * rs + left * P;
    wstride = rs;
    wpixel = P;
  } else if (!ya.data) {
    second.resize(static_cast<size_t>(rows * cols * C) + 32);
    horizontal_pass(base + top * rs, rs, Pi, C, 0, rows, xa, second.data(), cols * C, parallel);
    win = second.data(), wstride = cols * C, wpixel = C;
  } else if (!xa.data) {
    second.resize(static_cast<size_t>(rows * cols * P) + 32);
    vertical_pass(base + left * P, rs, 0, cols * P, ya, second.data(), cols * P, parallel);
    win = second.data(), wstride = cols * P, wpixel = P;
  } else if (!vertical_first) {
    const int64_t ylo = ya.lo(), yhi = ya.hi();
    first.resize(static_cast<size_t>((yhi - ylo) * cols * C) + 32);
    horizontal_pass(base + ylo * rs, rs, Pi, C, 0, yhi - ylo, xa, first.data(), cols * C, parallel);
    second.resize(static_cast<size_t>(rows * cols * C) + 32);
    vertical_pass(first.data(), cols * C, ylo, cols * C, ya, second.data(), cols * C, parallel);
    win = second.data(), wstride = cols * C, wpixel = C;
  } else {
    const int64_t xlo = xa.lo(), xhi = xa.hi();
    const int64_t span = (xhi - xlo) * P;
    first.resize(static_cast<size_t>(rows * span) + 32);
    vertical_pass(base + xlo * P, rs, 0, span, ya, first.data(), span, parallel);
    second.resize(static_cast<size_t>(rows * cols * C) + 32);
    horizontal_pass(first.data(), span, Pi, C, xlo, rows, xa, second.data(), cols * C, parallel);
    win = second.data(), wstride = cols * C, wpixel = C;
  }

  if (!tab) {
    uint8_t* o = out.data_ptr<uint8_t>();
    for (int64_t y = 0; y < rows; ++y) {
      const uint8_t* w = win + y * wstride;
      uint8_t* d = o + y * cols * C;
      if (wpixel == C) {
        std::memcpy(d, w, static_cast<size_t>(cols * C));
      } else {
        for (int64_t x = 0; x < cols; ++x)
          for (int c = 0; c < C; ++c) d[x * C + c] = w[x * wpixel + c];
      }
    }
    return;
  }
  float* o = out.data_ptr<float>();
  const int64_t cs = out.stride(0), ys = out.stride(1);
  for_range(rows, 32, parallel, [&](int64_t y_begin, int64_t y_end) {
    for (int64_t y = y_begin; y < y_end; ++y) {
      const uint8_t* w = win + y * wstride;
      for (int c = 0; c < C; ++c) {
        const float* tc = tab + c * 256;
        float* d = o + c * cs + (dy + y) * ys + dx;
        const uint8_t* wc = w + c;
        for (int64_t x = 0; x < cols; ++x) d[x] = tc[wc[x * wpixel]];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastllava, m) {
  m.def("resample_window(Tensor src, int channels, Tensor? ycoef, int top, int rows, Tensor? xcoef, int left, "
        "int cols, bool vertical_first, Tensor(a!) out, Tensor? table, int dy, int dx, bool parallel=False) -> ()");
}

TORCH_LIBRARY_IMPL(fastllava, CPU, m) {
  m.impl("resample_window", &resample_window);
}
