// A decode step's decoder layers, final norm and lm_head as one call: the lean step's per-layer sequence
// (generation/lean_step.py) run from C++ over tensors bound once, so a token costs one Python call into the layers
// instead of ~10 per layer.
//
// Why: with the products stubbed out, a llava-interleave-qwen-0.5b step on two threads still took ~1.5 ms, most of
// it Python and dispatcher time around ~30 us of work per layer; that is ~10% of an int8 step and what kept int8
// from twice our bf16 speed. Measured (two threads, 757-token prompt, against the Python loop, interleaved runs):
// int8 15.5 -> 13.9 ms a step, bf16 27.5 -> 25.5 ms. The functions called are the ops' own (decode_ops.h) in the
// lean step's order, with ATen's silu and mul where the Python used them, so the logits are the same bit for bit
// as the module path's (tests/test_lean_step.py).
//
// Python builds a `torch.classes.fastllava.DecoderLayers` once per model: add_layer() per decoder layer, then its
// four products with add_product(); lm_head and the final norm last.

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "decode_ops.h"

namespace {

// One few-row product over stored weights, and the output widths it is split into (one entry: not split).
struct Product {
  enum class Op { kHalf, kInt8, kInt8Pairs, kInt4, kInt4Q8 } op = Op::kHalf;
  at::Tensor weight, scales, zeros;
  std::optional<at::Tensor> bias;
  int64_t group = 0;
  std::vector<int64_t> sizes;

  at::Tensor operator()(const at::Tensor& x) const {
    switch (op) {
      case Op::kHalf: return fastllava::gemv(x, weight, bias);
      case Op::kInt8: return fastllava::gemv_int8(x, weight, scales, bias);
      case Op::kInt8Pairs: return fastllava::gemv_int8_pairs(x, weight, scales, bias);
      case Op::kInt4: return fastllava::gemv_int4(x, weight, scales, zeros, group, bias);
      case Op::kInt4Q8: return fastllava::gemv_int4_q8(x, weight, scales, zeros, group, bias);
    }
    TORCH_CHECK(false, "fastllava DecoderLayers: unknown product");
  }
};

// A layer's outputs that read one input (q/k/v, gate/up): one product over adjacent weights split into them, or
// one product each where the weights are not adjacent.
struct Products {
  std::vector<Product> parts;

  std::vector<at::Tensor> operator()(const at::Tensor& x) const {
    std::vector<at::Tensor> outputs;
    for (const Product& p : parts)
      for (at::Tensor& out : p(x).split_with_sizes(p.sizes, -1)) outputs.push_back(std::move(out));
    return outputs;
  }

  size_t outputs() const {
    size_t count = 0;
    for (const Product& p : parts) count += p.sizes.size();
    return count;
  }
};

Product make_product(const std::string& op, at::Tensor weight, const std::optional<at::Tensor>& scales,
                     const std::optional<at::Tensor>& zeros, int64_t group, const std::optional<at::Tensor>& bias,
                     std::vector<int64_t> sizes) {
  Product p;
  if (op == "gemv") p.op = Product::Op::kHalf;
  else if (op == "gemv_int8") p.op = Product::Op::kInt8;
  else if (op == "gemv_int8_pairs") p.op = Product::Op::kInt8Pairs;
  else if (op == "gemv_int4") p.op = Product::Op::kInt4;
  else if (op == "gemv_int4_q8") p.op = Product::Op::kInt4Q8;
  else TORCH_CHECK(false, "fastllava DecoderLayers: unknown product op '", op, "'");
  const bool needs_scales = p.op != Product::Op::kHalf;
  const bool needs_zeros = p.op == Product::Op::kInt4 || p.op == Product::Op::kInt4Q8;
  TORCH_CHECK(!needs_scales || scales.has_value(), "fastllava DecoderLayers: ", op, " needs scales");
  TORCH_CHECK(!needs_zeros || zeros.has_value(), "fastllava DecoderLayers: ", op, " needs zeros");
  TORCH_CHECK(weight.dim() == 2, "fastllava DecoderLayers: a product's weight must be 2-D, got ", weight.sizes());
  int64_t total = 0;
  for (int64_t size : sizes) total += size;
  TORCH_CHECK(!sizes.empty() && total == weight.size(0), "fastllava DecoderLayers: output widths ", sizes,
              " do not add up to the weight's ", weight.size(0), " rows");
  p.weight = std::move(weight);
  if (scales) p.scales = *scales;
  if (zeros) p.zeros = *zeros;
  p.group = group, p.bias = bias, p.sizes = std::move(sizes);
  return p;
}

struct Layer {
  int64_t index;  // the layer's cache and mask index
  at::Tensor input_norm, post_norm;
  double input_eps, post_eps, scale;
  Products qkv, gate_up;  // 3 and 2 outputs
  std::optional<Product> o_proj, down;
};

struct DecoderLayers : torch::CustomClassHolder {
  explicit DecoderLayers(bool fused_silu) : fused_silu(fused_silu) {}

  void add_layer(int64_t index, at::Tensor input_norm, double input_eps, at::Tensor post_norm, double post_eps,
                 double scale) {
    layers.push_back(
        Layer{index, std::move(input_norm), std::move(post_norm), input_eps, post_eps, scale, {}, {}, {}, {}});
    checked = false;
  }

  // part: "qkv" (one product split into q, k, v, or one product each), "o_proj", "gate_up" (likewise gate, up),
  // "down" of the last layer added, or "lm_head".
  void add_product(const std::string& part, const std::string& op, at::Tensor weight,
                   const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& zeros, int64_t group,
                   const std::optional<at::Tensor>& bias, std::vector<int64_t> sizes) {
    Product p = make_product(op, std::move(weight), scales, zeros, group, bias, std::move(sizes));
    if (part == "lm_head") {
      lm_head = std::move(p);
      checked = false;
      return;
    }
    TORCH_CHECK(!layers.empty(), "fastllava DecoderLayers: add_layer before its products");
    Layer& layer = layers.back();
    if (part == "qkv") layer.qkv.parts.push_back(std::move(p));
    else if (part == "o_proj") layer.o_proj = std::move(p);
    else if (part == "gate_up") layer.gate_up.parts.push_back(std::move(p));
    else if (part == "down") layer.down = std::move(p);
    else TORCH_CHECK(false, "fastllava DecoderLayers: unknown part '", part, "'");
    checked = false;
  }

  void set_final_norm(at::Tensor weight, double eps) {
    final_norm = std::move(weight), final_eps = eps, checked = false;
  }

  // x (B, 1, C) embedded tokens; cos/sin the new positions' RoPE tables; keys/values/valid per layer index (the
  // cache and the (B, kv_len) masks); slot the cache row this step writes -> fp32 logits (B, V).
  at::Tensor run(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, std::vector<at::Tensor> keys,
                 std::vector<at::Tensor> values, int64_t slot, int64_t kv_len, const std::vector<at::Tensor>& valid) {
    const size_t caches = std::min({keys.size(), values.size(), valid.size()});
    return forward(x, caches, [&](const Layer& layer, size_t i, std::vector<at::Tensor>& qkv) {
      return fastllava::decode_attention_step(qkv[0], qkv[1], qkv[2], cos, sin, keys[i], values[i], slot, kv_len,
                                              valid[i], layer.scale);
    });
  }

  // Several sequences with caches of their own (the engine's): x (B, 1, C), cos/sin (B, 1, D) each row's RoPE
  // table; keys/values/valid hold B x `layers` entries, sequence by sequence ([b * layers + layer index]): the
  // sequence's (1, Hkv, L, D) caches and (1, kv_len) masks; slots[b] the cache row its new token writes (kv_len =
  // slots[b] + 1). The products run once over the B rows, attention per sequence -> fp32 logits (B, V).
  at::Tensor run_ragged(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, std::vector<at::Tensor> keys,
                        std::vector<at::Tensor> values, const std::vector<int64_t>& slots,
                        const std::vector<at::Tensor>& valid, int64_t layers) {
    const auto batch = static_cast<size_t>(x.size(0));
    TORCH_CHECK(layers > 0 && slots.size() == batch && keys.size() == batch * static_cast<size_t>(layers) &&
                    values.size() == keys.size() && valid.size() == keys.size() && cos.size(0) == x.size(0) &&
                    sin.size(0) == x.size(0),
                "fastllava DecoderLayers.run_ragged: ", batch, " rows need ", batch, " slots and ", batch, " x ",
                layers, " caches and masks, and a RoPE row each; got ", slots.size(), " slots, ", keys.size(),
                " key caches, ", values.size(), " value caches, ", valid.size(), " masks");
    std::vector<at::Tensor> row_cos, row_sin;  // each row's RoPE table, sliced once for all layers
    for (int64_t row = 0; row < x.size(0); ++row)
      row_cos.push_back(cos.narrow(0, row, 1)), row_sin.push_back(sin.narrow(0, row, 1));
    return forward(x, static_cast<size_t>(layers), [&](const Layer& layer, size_t i, std::vector<at::Tensor>& qkv) {
      std::vector<at::Tensor> rows;
      rows.reserve(batch);
      for (size_t b = 0; b < batch; ++b) {
        const auto row = static_cast<int64_t>(b);
        at::Tensor q = qkv[0].narrow(0, row, 1), k = qkv[1].narrow(0, row, 1);
        const size_t at = b * static_cast<size_t>(layers) + i;
        rows.push_back(fastllava::decode_attention_step(q, k, qkv[2].narrow(0, row, 1), row_cos[b], row_sin[b],
                                                        keys[at], values[at], slots[b], slots[b] + 1, valid[at],
                                                        layer.scale));
      }
      return batch == 1 ? rows[0] : at::cat(rows, 0);
    });
  }

  // The layers, final norm and lm_head; attend(layer, cache index, {q, k, v}) -> the attention output (B, 1, H D).
  template <typename Attend>
  at::Tensor forward(at::Tensor x, size_t caches, const Attend& attend) {
    if (!checked) check_complete();
    for (Layer& layer : layers) {
      const auto i = static_cast<size_t>(layer.index);
      TORCH_CHECK(i < caches, "fastllava DecoderLayers: layer ", layer.index, " has no cache or mask (",
                  caches, " of each)");
      std::vector<at::Tensor> qkv = layer.qkv(fastllava::rms_norm(x, layer.input_norm, layer.input_eps));
      const at::Tensor attended = attend(layer, i, qkv);
      x = at::add(x, (*layer.o_proj)(attended));
      const std::vector<at::Tensor> gate_up = layer.gate_up(fastllava::rms_norm(x, layer.post_norm, layer.post_eps));
      const at::Tensor activated =
          fused_silu ? fastllava::silu_mul(gate_up[0], gate_up[1]) : at::mul(at::silu(gate_up[0]), gate_up[1]);
      x = at::add(x, (*layer.down)(activated));
    }
    const at::Tensor hidden = fastllava::rms_norm(x, final_norm, final_eps);
    return (*lm_head)(hidden.select(1, -1)).to(at::kFloat);
  }

  // Every layer has its 3 + 2 split outputs and single products, and the head its norm and product.
  void check_complete() {
    TORCH_CHECK(lm_head.has_value() && final_norm.defined(), "fastllava DecoderLayers: lm_head or final norm not set");
    for (const Layer& layer : layers)
      TORCH_CHECK(layer.qkv.outputs() == 3 && layer.gate_up.outputs() == 2 && layer.o_proj && layer.down,
                  "fastllava DecoderLayers: layer ", layer.index, " needs q/k/v, o_proj, gate/up and down products");
    checked = true;
  }

  bool fused_silu, checked = false;
  std::vector<Layer> layers;
  std::optional<Product> lm_head;
  at::Tensor final_norm;
  double final_eps = 0.0;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastllava, m) {
  m.class_<DecoderLayers>("DecoderLayers")
      .def(torch::init<bool>())
      .def("add_layer", &DecoderLayers::add_layer)
      .def("add_product", &DecoderLayers::add_product)
      .def("set_final_norm", &DecoderLayers::set_final_norm)
      .def("run", &DecoderLayers::run)
      .def("run_ragged", &DecoderLayers::run_ragged);
}
