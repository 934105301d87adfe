// KronBlock: one natgrad::nn layer's Kronecker factors (see kfac_blocks.h; the reference is
// python/natgrad/curvature/kron.py, whose comments explain the scaling).
#include "api/kfac_blocks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "factors/kron_factors.h"
#include "linalg/psd_linalg.h"
#include "precondition/kfac_precondition.h"

namespace natgrad::optim::detail {

namespace {

int64_t rows_of(const torch::Tensor& t, int64_t width) { return t.numel() / std::max<int64_t>(width, 1); }

torch::Tensor cat_rows(const std::vector<torch::Tensor>& ts, int64_t width) {
  if (ts.size() == 1) return ts[0];
  std::vector<torch::Tensor> rows;
  for (const auto& t : ts) rows.push_back(t.reshape({-1, width}));
  return torch::cat(rows);
}

torch::Tensor bounded(const torch::Tensor& t, double count, double limit) {
  torch::Tensor peak = max_abs(t);  // NaN propagates: NaN < limit is false
  return (peak * peak * count).lt(limit);
}

std::vector<int64_t> vec(at::IntArrayRef a) { return a.vec(); }

}  // namespace

torch::Tensor max_abs(const torch::Tensor& t) {
  if (t.numel() == 0) return torch::zeros({}, t.options().dtype(torch::kDouble));
  auto [low, high] = torch::aminmax(t);
  return torch::maximum(high, -low).to(torch::kDouble);
}

std::optional<std::string> KronBlock::unsupported_reason(torch::nn::Module& module) {
  if (auto* conv = dynamic_cast<torch::nn::Conv2dImpl*>(&module)) {
    const auto& o = conv->options;
    if (o.groups() != 1) return "grouped convolution (groups=" + std::to_string(o.groups()) + ")";
    const bool numeric = std::holds_alternative<torch::ExpandingArray<2>>(o.padding());
    const bool zeros = std::holds_alternative<torch::enumtype::kZeros>(o.padding_mode());
    if (!numeric || !zeros) {
      return std::string("padding=") +
             (numeric ? "numeric" : (std::holds_alternative<torch::enumtype::kSame>(o.padding())
                                         ? "'same'"
                                         : "'valid'")) +
             ", padding_mode=" + (zeros ? "'zeros'" : "not 'zeros'");
    }
  }
  if (auto* emb = dynamic_cast<torch::nn::EmbeddingImpl*>(&module)) {
    if (emb->options.sparse()) return "sparse gradients";
    if (emb->options.max_norm().has_value()) return "max_norm renormalises weights in forward";
  }
  return std::nullopt;
}

KronBlock::KronBlock(std::string name, std::shared_ptr<torch::nn::Module> module)
    : name_(std::move(name)), module_(std::move(module)) {
  layer_ = nn::as_capture_layer(*module_);
  TORCH_CHECK(layer_ != nullptr, "KronBlock: module '", name_, "' is not a natgrad::nn layer");
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
    TORCH_CHECK(emb != nullptr, "KronBlock: unknown layer kind of '", name_, "'");
    kind_ = Kind::kEmbedding;
    weight_ = emb->weight;
  }
}

std::vector<torch::Tensor> KronBlock::params() const {
  if (bias_.defined()) return {weight_, bias_};
  return {weight_};
}

std::string KronBlock::description() const {
  switch (kind_) {
    case Kind::kLinear: return "K-FAC linear (expand)";
    case Kind::kConv2d: return "K-FAC conv2d";
    default: return "K-FAC embedding";
  }
}

bool KronBlock::has_inverse() const {
  if (kind_ == Kind::kEmbedding) return state.count("g_eigenvectors") > 0;
  return state.count("g_eigenvectors") > 0 || state.count("g_inverse") > 0;
}

int64_t KronBlock::a_dim() const {
  if (kind_ == Kind::kEmbedding) return weight_.size(0);
  return weight_[0].numel() + (bias_.defined() ? 1 : 0);
}

int64_t KronBlock::g_dim() const {
  return kind_ == Kind::kEmbedding ? weight_.size(1) : weight_.size(0);
}

int64_t KronBlock::count_samples(const std::vector<torch::Tensor>& inputs) const {
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

int64_t KronBlock::count_rows(const std::vector<torch::Tensor>& inputs) const {
  int64_t n = 0;
  for (const auto& x : inputs) {
    if (kind_ == Kind::kLinear) {
      n += rows_of(x, weight_.size(1));
    } else if (kind_ == Kind::kEmbedding) {
      n += x.numel();
    } else {
      const auto& o = dynamic_cast<torch::nn::Conv2dImpl&>(*module_).options;
      const auto pad = std::get<torch::ExpandingArray<2>>(o.padding());
      auto out = [&](int64_t size, int i) {
        return (size + 2 * (*pad)[i] - (*o.dilation())[i] * ((*o.kernel_size())[i] - 1) - 1) /
                   (*o.stride())[i] + 1;
      };
      n += x.dim() == 4 ? x.size(0) * out(x.size(-2), 0) * out(x.size(-1), 1) : 1;
    }
  }
  return n;
}

double KronBlock::sample_scale(const std::vector<torch::Tensor>& inputs,
                               const std::string& loss_reduction) const {
  if (loss_reduction == "sum") return 1.0;
  const int64_t samples = count_samples(inputs);
  if (loss_reduction == "mean") return static_cast<double>(samples);
  return std::sqrt(static_cast<double>(samples) * static_cast<double>(count_rows(inputs)));
}

KronStatistics KronBlock::prepare(const std::vector<torch::Tensor>& inputs,
                                  const std::vector<torch::Tensor>& grads,
                                  double grad_scale) const {
  KronStatistics s;
  if (kind_ == Kind::kLinear) {
    const int64_t d_in = weight_.size(1), d_out = weight_.size(0);
    const int64_t samples = count_samples(inputs);
    s.inputs = cat_rows(inputs, d_in);
    s.grads = cat_rows(grads, d_out);
    s.input_rows = rows_of(s.inputs, d_in);
    s.grad_rows = s.grads.numel() / d_out;
    const int64_t positions = s.input_rows / std::max<int64_t>(samples, 1);
    const int64_t passes = s.grad_rows / std::max<int64_t>(s.input_rows, 1);
    s.grad_scale = grad_scale * std::sqrt(static_cast<double>(std::max<int64_t>(positions, 1) *
                                                              std::max<int64_t>(passes, 1)));
  } else if (kind_ == Kind::kConv2d) {
    s.inputs = inputs.size() == 1 ? inputs[0] : torch::cat(inputs);
    s.grads = grads.size() == 1 ? grads[0] : torch::cat(grads);
    const int64_t positions = s.grads.size(2) * s.grads.size(3);
    const int64_t passes =
        std::max<int64_t>(s.grads.size(0) / std::max<int64_t>(s.inputs.size(0), 1), 1);
    const int64_t rows = s.inputs.size(0) * positions;
    s.grad_scale = grad_scale * std::sqrt(static_cast<double>(positions * passes));
    s.input_rows = rows;
    s.grad_rows = rows * passes;
  } else {
    const int64_t dim = weight_.size(1);
    std::vector<torch::Tensor> flat, rows;
    for (const auto& t : inputs) flat.push_back(t.reshape({-1}));
    for (const auto& t : grads) rows.push_back(t.reshape({-1, dim}));
    s.inputs = torch::cat(flat);
    s.grads = torch::cat(rows);
    const int64_t n = s.inputs.numel();
    const int64_t positions = n / std::max<int64_t>(count_samples(inputs), 1);
    const int64_t passes = std::max<int64_t>(s.grads.size(0) / std::max<int64_t>(n, 1), 1);
    s.grad_scale =
        grad_scale * std::sqrt(static_cast<double>(std::max<int64_t>(positions, 1) * passes));
    s.input_rows = n;
    s.grad_rows = s.grads.size(0);
  }
  return s;
}

torch::Tensor KronBlock::statistics_ok(const KronStatistics& s) const {
  const double limit = (weight_.scalar_type() == torch::kDouble
                            ? std::numeric_limits<double>::max()
                            : static_cast<double>(std::numeric_limits<float>::max())) /
                       4;
  torch::Tensor ok = bounded(s.grads,
                             static_cast<double>(std::max<int64_t>(s.grad_rows, 1)) *
                                 std::max(s.grad_scale * s.grad_scale, 1.0),
                             limit);
  if (s.inputs.is_floating_point()) {
    ok = ok.logical_and(
        bounded(s.inputs, static_cast<double>(std::max<int64_t>(s.input_rows, 1)), limit));
  }
  return ok;
}

void KronBlock::ensure_factors() {
  auto opts = weight_.options().requires_grad(false);
  if (!state.count("A")) {
    state["A"] = kind_ == Kind::kEmbedding ? torch::zeros({a_dim()}, opts)
                                           : torch::zeros({a_dim(), a_dim()}, opts);
  }
  if (!state.count("G")) state["G"] = torch::zeros({g_dim(), g_dim()}, opts);
}

void KronBlock::apply_update(const KronStatistics& s, double decay) {
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

int64_t KronBlock::update_inverse(const std::string& method, double damping, bool pi_correction) {
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

torch::Tensor KronBlock::precondition_embedding(const torch::Tensor& packed, double damping,
                                                bool pi_correction) const {
  // EmbeddingBlock.precondition: the same op, in the decomposition's dtype.
  const torch::Tensor& vecs = state.at("g_eigenvectors");
  return kfac_precondition_diagonal_a(packed.to(vecs.scalar_type()),
                                      state.at("A").to(vecs.scalar_type()),
                                      state.at("g_eigenvalues"), vecs, damping, pi_correction)
      .to(packed.scalar_type());
}

std::map<std::string, std::vector<int64_t>> KronBlock::expected_shapes() const {
  const int64_t a = a_dim(), g = g_dim();
  if (kind_ == Kind::kEmbedding) {
    return {{"A", {a}}, {"G", {g, g}}, {"g_eigenvalues", {g}}, {"g_eigenvectors", {g, g}}};
  }
  return {{"A", {a, a}},          {"G", {g, g}},          {"a_eigenvalues", {a}},
          {"a_eigenvectors", {a, a}}, {"g_eigenvalues", {g}}, {"g_eigenvectors", {g, g}},
          {"a_inverse", {a, a}},  {"g_inverse", {g, g}}};
}

}  // namespace natgrad::optim::detail
