// The pair layout of int8 weights (N, K), N even, K a multiple of 128: rows 2p and 2p + 1 stored block by block,
// [row 2p, columns 0-127][row 2p + 1, columns 0-127][row 2p, 128-255][row 2p + 1, 128-255]..., the same bytes in
// another order. int8_pairs_(weight, to_pairs) rearranges a weight in place (one pair of rows at a time through a
// small buffer: no second copy of the weight); gemv_int8_pairs (gemv.cpp) reads it, int8_pair_rows looks rows up.
//
// Why: the batch-1 int8 VNNI loop loads each 128-column block of the activations (two int8 parts, four vectors)
// for every weight row; with two rows' blocks side by side in one sequential stream it loads them once for both
// rows (gemv_vnni.cpp int8_pair_lanes). Two rows read from two separate streams instead ran at half the speed
// (Zen 4's prefetchers lose them). Measured (llava-interleave-qwen-0.5b's 97 decode products from huge pages,
// interleaved runs): one thread +18% (int8 then reads at the bf16 loop's bandwidth), two threads +2% where the
// memory is the limit; whole greedy decode steps (int8 model, row and pair layouts switched in one process, same
// tokens): one thread +5.5-7.5%, two threads +1-6% (more when the machine's bandwidth is high).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "decode_ops.h"

namespace {

constexpr int64_t kPairBlock = 128;

void int8_pairs_(at::Tensor& weight, bool to_pairs) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kChar && weight.dim() == 2 &&
                  weight.is_contiguous(),
              "fastllava int8_pairs_: needs a contiguous 2-D int8 CPU weight, got ", weight.scalar_type(), " ",
              weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % 2 == 0 && K % kPairBlock == 0, "fastllava int8_pairs_: the pair layout needs an even number of ",
              "rows and a multiple of ", kPairBlock, " columns, got ", weight.sizes());
  auto* data = weight.data_ptr<int8_t>();
  const int64_t blocks = K / kPairBlock;
  at::parallel_for(0, N / 2, 64, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> pair(static_cast<size_t>(2 * K));
    for (int64_t p = begin; p < end; ++p) {
      int8_t* rows = data + 2 * p * K;
      std::memcpy(pair.data(), rows, static_cast<size_t>(2 * K));
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t r = 0; r < 2; ++r) {
          const int64_t plain = r * K + b * kPairBlock, paired = (2 * b + r) * kPairBlock;
          if (to_pairs) std::memcpy(rows + paired, pair.data() + plain, kPairBlock);
          else std::memcpy(rows + plain, pair.data() + paired, kPairBlock);
        }
    }
  });
}

// Rows `ids` (any shape, int64) of a pair-layout weight, row-major: (*ids.shape, K). The lookup of an int8
// embedding whose codes are a tied head's (one op instead of the five small tensor ops of a view-and-index).
at::Tensor int8_pair_rows(const at::Tensor& weight, const at::Tensor& ids) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kChar && weight.dim() == 2 &&
                  weight.is_contiguous() && weight.size(0) % 2 == 0 && weight.size(1) % kPairBlock == 0,
              "fastllava int8_pair_rows: needs a contiguous pair-layout int8 CPU weight, got ", weight.sizes());
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong, "fastllava int8_pair_rows: ids must be int64 "
              "on the CPU, got ", ids.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1), blocks = K / kPairBlock;
  const at::Tensor flat = ids.contiguous();
  auto sizes = ids.sizes().vec();
  sizes.push_back(K);
  at::Tensor out = at::empty(sizes, weight.options());
  const int64_t* rows = flat.data_ptr<int64_t>();
  const int8_t* data = weight.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const int64_t row = rows[i];
    TORCH_CHECK(row >= 0 && row < N, "fastllava int8_pair_rows: index ", row, " is out of range for ", N, " rows");
    const int8_t* pair = data + (row & ~int64_t{1}) * K + (row & 1) * kPairBlock;
    for (int64_t b = 0; b < blocks; ++b)
      std::memcpy(dst + i * K + b * kPairBlock, pair + 2 * b * kPairBlock, kPairBlock);
  }
  return out;
}

}  // namespace

at::Tensor fastllava::int8_pair_rows(const at::Tensor& weight, const at::Tensor& ids) {
  return ::int8_pair_rows(weight, ids);
}

void fastllava::int8_pairs_(at::Tensor& weight, bool to_pairs) { ::int8_pairs_(weight, to_pairs); }

TORCH_LIBRARY_FRAGMENT(fastllava, m) {
  m.def("int8_pairs_(Tensor(a!) weight, bool to_pairs) -> ()");
  m.def("int8_pair_rows(Tensor weight, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastllava, CPU, m) {
  m.impl("int8_pairs_", &int8_pairs_);
  m.impl("int8_pair_rows", &int8_pair_rows);
}
