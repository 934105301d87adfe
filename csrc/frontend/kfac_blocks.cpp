// KroneckerBlock: one natgrad::nn layer's Kronecker factors (see kfac_blocks.h; the scaling is
// explained in python/natgrad/curvature/kron.py, which builds the same statistics).
#include "frontend/kfac_blocks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "factors/kron_factors.h"
#include "kfac/kfac_rules.h"
#include "linalg/psd_linalg.h"
#include "precondition/kfac_precondition.h"

namespace natgrad::optim::detail {

namespace {

int64_t rows_of(const torch::Tensor& t, int64_t width) {
  return kfac::linear_rows(t.sizes(), width);
}

torch::Tensor cat_rows(const std::vector<torch::Tensor>& ts, int64_t width) {
  if (ts.size() == 1) return ts[0];
  std::vector<torch::Tensor> rows;
  for (const auto& t : ts) rows.push_back(t.reshape({-1, width}));
  return torch::cat(rows);
}

std::vector<int64_t> vec(at::IntArrayRef a) { return a.vec(); }

// A Conv2d's padding as Python writes nn.Conv2d's: "(1, 1)", "'same'" or "'valid'".
std::string padding_text(const torch::nn::detail::ConvNdOptions<2>& o) {
  if (const auto* pad = std::get_if<torch::ExpandingArray<2>>(&o.padding())) {
    return "(" + std::to_string((**pad)[0]) + ", " + std::to_string((**pad)[1]) + ")";
  }
  return std::holds_alternative<torch::enumtype::kSame>(o.padding()) ? "'same'" : "'valid'";
}

// A Conv2d's padding_mode as Python names it.
std::string padding_mode_name(const torch::nn::detail::ConvNdOptions<2>& o) {
  const auto& mode = o.padding_mode();
  if (std::holds_alternative<torch::enumtype::kZeros>(mode)) return "zeros";
  if (std::holds_alternative<torch::enumtype::kReflect>(mode)) return "reflect";
  if (std::holds_alternative<torch::enumtype::kReplicate>(mode)) return "replicate";
  return "circular";
}

std::optional<std::string> or_none(std::string reason) {
  return reason.empty() ? std::nullopt : std::optional<std::string>(std::move(reason));
}

}  // namespace

std::optional<std::string> KroneckerBlock::unsupported_reason(torch::nn::Module& module) {
  if (auto* conv = dynamic_cast<torch::nn::Conv2dImpl*>(&module)) {
    const auto& o = conv->options;
    return or_none(
        kfac::conv_unsupported_reason(o.groups(), padding_text(o), padding_mode_name(o)));
  }
  if (auto* emb = dynamic_cast<torch::nn::EmbeddingImpl*>(&module)) {
    return or_none(kfac::embedding_unsupported_reason(emb->options.sparse(),
                                                      emb->options.max_norm().has_value()));
  }
  return std::nullopt;
}

KroneckerBlock::KroneckerBlock(std::string name, std::shared_ptr<torch::nn::Module> module)
    : name_(std::move(name)), module_(std::move(module)) {
  layer_ = nn::as_capture_layer(*module_);
  TORCH_CHECK(layer_ != nullptr, "KroneckerBlock: module '", name_, "' is not a natgrad::nn layer");
  if (auto* fc = dynamic_cast<torch::nn::LinearImpl*>(module_.get())) {
    kind_ = Kind::kLinear;
    weight_ = fc->weight;
    bias_ = fc->bias;
  } else if (auto* conv = dynamic_cast<torch::nn::Conv2dImpl*>(module_.get())) {
    kind_ = Kind::kConv2d;
    weight_ = conv->weight;
    bias_ = conv->bias;
  } else {
    auto* emb = dynamic_cast<torch::nn::EmbeddingImpl*>(module_.get());
    TORCH_CHECK(emb != nullptr, "KroneckerBlock: unknown layer kind of '", name_, "'");
    kind_ = Kind::kEmbedding;
    weight_ = emb->weight;
  }
}

std::vector<torch::Tensor> KroneckerBlock::params() const {
  if (bias_.defined()) return {weight_, bias_};
  return {weight_};
}

std::string KroneckerBlock::description() const {
  switch (kind_) {
    case Kind::kLinear:
      return "K-FAC linear (expand)";
    case Kind::kConv2d:
      return "K-FAC conv2d";
    default:
      return "K-FAC embedding";
  }
}

bool KroneckerBlock::has_inverse() const {
  if (kind_ == Kind::kEmbedding) return state.count("g_eigenvectors") > 0;
  return state.count("g_eigenvectors") > 0 || state.count("g_inverse") > 0;
}

int64_t KroneckerBlock::a_dim() const {
  if (kind_ == Kind::kEmbedding) return weight_.size(0);
  return weight_[0].numel() + (bias_.defined() ? 1 : 0);
}

int64_t KroneckerBlock::g_dim() const {
  return kind_ == Kind::kEmbedding ? weight_.size(1) : weight_.size(0);
}

int64_t KroneckerBlock::count_samples(const std::vector<torch::Tensor>& inputs) const {
  int64_t n = 0;
  for (const auto& x : inputs) {
    if (kind_ == Kind::kEmbedding) {
      n += x.dim() > 0 ? x.size(0) : 1;
    } else {
      n += x.dim() > 1 ? x.size(0) : 1;
    }
  }
  return n;
}

int64_t KroneckerBlock::count_rows(const std::vector<torch::Tensor>& inputs) const {
  int64_t n = 0;
  for (const auto& x : inputs) {
    if (kind_ == Kind::kLinear) {
      n += kfac::linear_rows(x.sizes(), weight_.size(1));
    } else if (kind_ == Kind::kEmbedding) {
      n += kfac::embedding_rows(x.sizes());
    } else {
      const auto& o = dynamic_cast<torch::nn::Conv2dImpl&>(*module_).options;
      const auto pad = std::get<torch::ExpandingArray<2>>(o.padding());
      n += kfac::conv_rows(x.sizes(), *o.kernel_size(), *o.stride(), *pad, *o.dilation());
    }
  }
  return n;
}

double KroneckerBlock::sample_scale(const std::vector<torch::Tensor>& inputs,
                                    const std::string& loss_reduction, int64_t batch) const {
  return kfac::sample_scale(count_samples(inputs),
                            loss_reduction == "token_mean" ? count_rows(inputs) : 0,
                            loss_reduction, batch);
}

KroneckerStatistics KroneckerBlock::prepare(const std::vector<torch::Tensor>& inputs,
                                            const std::vector<torch::Tensor>& grads,
                                            double grad_scale) const {
  KroneckerStatistics s;
  if (kind_ == Kind::kLinear) {
    const int64_t d_in = weight_.size(1), d_out = weight_.size(0);
    const int64_t samples = count_samples(inputs);
    s.inputs = cat_rows(inputs, d_in);
    s.grads = cat_rows(grads, d_out);
    s.input_rows = rows_of(s.inputs, d_in);
    s.grad_rows = s.grads.numel() / d_out;
    s.grad_scale = kfac::expand_grad_scale(grad_scale, samples, s.input_rows, s.grad_rows);
  } else if (kind_ == Kind::kConv2d) {
    s.inputs = inputs.size() == 1 ? inputs[0] : torch::cat(inputs);
    s.grads = grads.size() == 1 ? grads[0] : torch::cat(grads);
    const int64_t positions = s.grads.size(2) * s.grads.size(3);  // output pixels
    s.input_rows = s.inputs.size(0) * positions;
    s.grad_rows = s.grads.size(0) * positions;
    s.grad_scale =
        kfac::expand_grad_scale(grad_scale, s.inputs.size(0), s.input_rows, s.grad_rows);
  } else {
    // One row per distinct index of each sample, its occurrences' output gradients summed (the
    // sample's gradient of that weight row), per backward pass: grads[j] belongs to
    // inputs[j % inputs.size()].
    const int64_t dim = weight_.size(1), vocab = weight_.size(0);
    std::vector<torch::Tensor> keys, inverses, indices, rows;
    for (const auto& t : inputs) {
      const int64_t n = t.dim() > 0 ? t.size(0) : 1;
      const auto base = torch::arange(n, t.options()).unsqueeze(1) * vocab;
      auto merged = at::_unique(base + t.reshape({n, -1}), /*sorted=*/true, /*return_inverse=*/true);
      keys.push_back(std::get<0>(merged));
      inverses.push_back(std::get<1>(merged).reshape({-1}));
      indices.push_back(keys.back().remainder(vocab));
    }
    for (size_t j = 0; j < grads.size(); ++j) {
      const auto& inverse = inverses[j % inputs.size()];
      const auto flat = grads[j].reshape({-1, inverse.numel(), dim});
      rows.push_back(torch::zeros({flat.size(0), keys[j % inputs.size()].numel(), dim}, flat.options())
                         .index_add_(1, inverse, flat)
                         .reshape({-1, dim}));
    }
    s.inputs = torch::cat(indices);
    s.grads = torch::cat(rows);
    s.input_rows = s.inputs.numel();
    s.grad_rows = s.grads.size(0);
    s.grad_scale =
        kfac::expand_grad_scale(grad_scale, count_samples(inputs), s.input_rows, s.grad_rows);
  }
  return s;
}

torch::Tensor KroneckerBlock::statistics_ok(const KroneckerStatistics& s) const {
  return kfac::statistics_ok(s.inputs, s.grads, s.input_rows, s.grad_rows, s.grad_scale,
                             weight_.scalar_type());  // the factors take the weight's dtype
}

void KroneckerBlock::ensure_factors() {
  auto opts = weight_.options().requires_grad(false);
  if (!state.count("A")) {
    state["A"] = kind_ == Kind::kEmbedding ? torch::zeros({a_dim()}, opts)
                                           : torch::zeros({a_dim(), a_dim()}, opts);
  }
  if (!state.count("G")) state["G"] = torch::zeros({g_dim(), g_dim()}, opts);
}

void KroneckerBlock::apply_update(const KroneckerStatistics& s, double decay) {
  const double rho = has_factors() ? decay : 0.0;
  ensure_factors();
  torch::Tensor& a = state["A"];
  torch::Tensor& g = state["G"];
  if (kind_ == Kind::kLinear) {
    linear_act_factor_ema_(a, s.inputs, bias_.defined(), rho);
    linear_grad_factor_ema_(g, s.grads, s.grad_scale, rho);
  } else if (kind_ == Kind::kConv2d) {
    const auto& o = dynamic_cast<torch::nn::Conv2dImpl&>(*module_).options;
    const auto pad = std::get<torch::ExpandingArray<2>>(o.padding());
    conv2d_act_factor_ema_(a, s.inputs, vec(*o.kernel_size()), vec(*o.stride()), vec(*pad),
                           vec(*o.dilation()), bias_.defined(), rho);
    conv2d_grad_factor_ema_(g, s.grads, s.grad_scale, rho);
  } else {
    torch::Tensor counts = torch::bincount(s.inputs, {}, weight_.size(0)).to(a.scalar_type());
    a.mul_(rho).add_(counts / s.inputs.numel(), 1.0 - rho);
    linear_grad_factor_ema_(g, s.grads, s.grad_scale, rho);
  }
}

int64_t KroneckerBlock::update_inverse(const std::string& method, double damping,
                                       bool pi_correction) {
  for (const char* key : {"a_eigenvalues", "a_eigenvectors", "g_eigenvalues", "g_eigenvectors",
                          "a_inverse", "g_inverse"}) {
    state.erase(key);
  }
  const torch::Tensor& g = state.at("G");
  if (kind_ == Kind::kEmbedding) {
    EighResult eg = damped_eigh(g, 0.0);
    state["g_eigenvalues"] = eg.eigenvalues;
    state["g_eigenvectors"] = eg.eigenvectors;
    return static_cast<int64_t>(eg.rung);
  }
  const torch::Tensor& a = state.at("A");
  if (method == "inverse") {
    auto [g_inv, a_inv, rung] = kfac_damped_inverses(g, a, damping, pi_correction);
    state["g_inverse"] = g_inv;
    state["a_inverse"] = a_inv;
    return rung.item<int64_t>();
  }
  EighResult ea = damped_eigh(a, 0.0);
  EighResult eg = damped_eigh(g, 0.0);
  state["a_eigenvalues"] = ea.eigenvalues;
  state["a_eigenvectors"] = ea.eigenvectors;
  state["g_eigenvalues"] = eg.eigenvalues;
  state["g_eigenvectors"] = eg.eigenvectors;
  return std::max(static_cast<int64_t>(ea.rung), static_cast<int64_t>(eg.rung));
}

torch::Tensor KroneckerBlock::precondition_embedding(const torch::Tensor& packed, double damping,
                                                     bool pi_correction) const {
  // EmbeddingBlock.precondition: the same op, in the decomposition's dtype.
  const torch::Tensor& vecs = state.at("g_eigenvectors");
  return kfac_precondition_diagonal_a(packed.to(vecs.scalar_type()),
                                      state.at("A").to(vecs.scalar_type()),
                                      state.at("g_eigenvalues"), vecs, damping, pi_correction)
      .to(packed.scalar_type());
}

std::map<std::string, std::vector<int64_t>> KroneckerBlock::expected_shapes() const {
  const int64_t a = a_dim(), g = g_dim();
  if (kind_ == Kind::kEmbedding) {
    return {{"A", {a}}, {"G", {g, g}}, {"g_eigenvalues", {g}}, {"g_eigenvectors", {g, g}}};
  }
  return {{"A", {a, a}},          {"G", {g, g}},
          {"a_eigenvalues", {a}}, {"a_eigenvectors", {a, a}},
          {"g_eigenvalues", {g}}, {"g_eigenvectors", {g, g}},
          {"a_inverse", {a, a}},  {"g_inverse", {g, g}}};
}

}  // namespace natgrad::optim::detail
