// natgrad::optim::KFAC's per-step work after the curvature refresh: directions (the list ops
// for Linear/Conv2d, per block for Embedding, the plain gradient for the rest), the KL trust
// region and the momentum / weight-decay update, with one host read for all directions (their
// finite flags, <u, g> and, when the trust region bounds a momentum step, the buffers' <b, g>).
// The trust region's nu and the fault classes of the stats are the shared rules of
// kfac/kfac_rules.h.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "frontend/kfac.h"
#include "frontend/kfac_util.h"
#include "kfac/kfac_rules.h"
#include "precondition/kfac_step.h"

namespace natgrad::optim {

using detail::KroneckerBlock;

namespace detail {

std::string type_name(const torch::nn::Module& module) {
  std::string name = module.name();
  const auto colon = name.rfind("::");
  if (colon != std::string::npos) name = name.substr(colon + 2);
  const auto tmpl = name.find('<');
  if (tmpl != std::string::npos) name = name.substr(0, tmpl);
  if (name.size() > 4 && name.compare(name.size() - 4, 4, "Impl") == 0) {
    name = name.substr(0, name.size() - 4);
  }
  return name;
}

std::vector<bool> all_true(const std::vector<torch::Tensor>& flags) {
  std::vector<bool> out;
  if (flags.empty()) return out;
  const torch::Tensor values = torch::stack(flags).to(torch::kCPU, torch::kBool).contiguous();
  const bool* data = values.data_ptr<bool>();
  for (int64_t i = 0; i < values.numel(); ++i) out.push_back(data[i]);
  return out;
}

std::vector<double> read_values(const std::vector<torch::Tensor>& tensors) {
  if (tensors.empty()) return {};
  std::vector<torch::Tensor> flat;
  for (const auto& t : tensors) flat.push_back(t.reshape({-1}).to(torch::kDouble));
  const torch::Tensor all = torch::cat(flat).to(torch::kCPU).contiguous();
  return std::vector<double>(all.data_ptr<double>(), all.data_ptr<double>() + all.numel());
}

}  // namespace detail

namespace {

// One layer (or fallback parameter) of the directions pass: its parameters, gradients and
// directions, and its row of the stats read.
struct Layer {
  std::string name;
  bool plain = false;
  std::vector<torch::Tensor> params, grads, dirs;
  int64_t row = 0;    // offset of its stats row: grad ok, direction ok, <u, g> per slot,
  int64_t slots = 1;  // then <b, g> per slot when buffers are read (the list ops: 2 slots)
};

torch::Tensor grad_or_zeros(const torch::Tensor& p) {
  return p.grad().defined() ? p.grad() : torch::zeros_like(p);
}

}  // namespace

bool KFAC::cross_wanted() const {
  if (!global().kl_clip().has_value()) return false;
  for (const auto& group : param_groups()) {
    if (static_cast<const KFACOptions&>(group.options()).momentum() != 0.0) return true;
  }
  return false;
}

std::optional<torch::Tensor> KFAC::momentum_buffer_of(const torch::Tensor& p) const {
  if (group_options(p).momentum() == 0.0) return std::nullopt;
  auto it = state().find(p.unsafeGetTensorImpl());
  if (it == state().end()) return std::nullopt;
  const auto& s = static_cast<const KFACParamState&>(*it->second);
  if (!s.momentum_buffer().defined()) return std::nullopt;
  return s.momentum_buffer();
}

std::vector<KFAC::Direction> KFAC::directions(const std::set<std::string>& skipped) {
  // moving(): blocks to precondition, and the parameters that take the plain gradient.
  std::vector<KroneckerBlock*> moving;
  std::set<const void*> done;
  for (auto& block : blocks_) {
    std::vector<torch::Tensor> with_grad;
    for (const auto& p : block->params()) {
      done.insert(p.unsafeGetTensorImpl());
      if (p.grad().defined()) with_grad.push_back(p);
    }
    if (skipped.count(block->name()) || with_grad.empty()) continue;
    if (!decomposed_.count(block->name())) {  // no curvature yet: the plain gradient
      for (const auto& p : with_grad) done.erase(p.unsafeGetTensorImpl());
      continue;
    }
    moving.push_back(block.get());
  }
  std::vector<torch::Tensor> plain;
  for (const auto& group : param_groups()) {
    for (const auto& p : group.params()) {
      if (p.grad().defined() && !done.count(p.unsafeGetTensorImpl())) plain.push_back(p);
    }
  }

  const bool pi = global().pi_correction_enabled();
  const bool buffers = cross_wanted();  // <b, g> joins the read (Python: _cross_wanted)
  std::vector<Layer> layers;
  std::vector<torch::Tensor> stats;
  int64_t offset = 0;  // of the next stats row in the single read
  for (const char* key : {"g_eigenvectors", "g_inverse"}) {  // the list ops, one per method
    std::vector<KroneckerBlock*> group;
    for (KroneckerBlock* b : moving) {
      if (b->listable() && b->state.count(key)) group.push_back(b);
    }
    if (group.empty()) continue;
    std::vector<torch::Tensor> weights, g_vals, g_vecs, a_vals, a_vecs, g_invs, a_invs;
    c10::List<std::optional<torch::Tensor>> biases, w_bufs, b_bufs;
    std::vector<double> damping;
    for (KroneckerBlock* b : group) {
      const torch::Tensor w = grad_or_zeros(b->weight());
      weights.push_back(w.reshape({w.size(0), -1}));
      biases.push_back(b->bias().defined() ? std::optional<torch::Tensor>(grad_or_zeros(b->bias()))
                                           : std::nullopt);
      if (buffers) {
        const std::optional<torch::Tensor> buf = momentum_buffer_of(b->weight());
        w_bufs.push_back(buf ? std::optional<torch::Tensor>(buf->reshape({buf->size(0), -1}))
                             : std::nullopt);
        b_bufs.push_back(b->bias().defined() ? momentum_buffer_of(b->bias()) : std::nullopt);
      }
      const auto& s = b->state;
      if (std::string(key) == "g_eigenvectors") {
        g_vals.push_back(s.at("g_eigenvalues"));
        g_vecs.push_back(s.at("g_eigenvectors"));
        a_vals.push_back(s.at("a_eigenvalues"));
        a_vecs.push_back(s.at("a_eigenvectors"));
        damping.push_back(damping_of(b->weight()));
      } else {
        g_invs.push_back(s.at("g_inverse"));
        a_invs.push_back(s.at("a_inverse"));
      }
    }
    KfacDirections out =
        std::string(key) == "g_eigenvectors"
            ? kfac_directions_eigen(weights, biases, g_vals, g_vecs, a_vals, a_vecs, damping, pi,
                                    1.0, w_bufs, b_bufs)
            : kfac_directions_inverse(weights, biases, g_invs, a_invs, 1.0, w_bufs, b_bufs);
    stats.push_back(out.stats);
    TORCH_INTERNAL_ASSERT(out.stats.dim() == 2 && out.stats.size(1) >= 4, "unexpected stats shape");
    const int64_t columns = out.stats.size(1);  // 4, or 6 with buffers (<b_w, g_w>, <b_b, g_b>)
    TORCH_INTERNAL_ASSERT(!buffers || columns >= 6, "the list op returned no <b, g> columns");
    size_t next_bias = 0;
    for (size_t i = 0; i < group.size(); ++i) {
      KroneckerBlock* b = group[i];
      Layer layer{b->name(),
                  false,
                  b->params(),
                  {weights[i].view_as(b->weight())},
                  {out.weight[i].view_as(b->weight())},
                  offset,
                  2};
      offset += columns;
      if (b->bias().defined()) {
        layer.grads.push_back(*biases.get(i));
        layer.dirs.push_back(out.bias[next_bias++]);
      }
      layers.push_back(std::move(layer));
    }
  }
  const torch::Tensor zero = torch::zeros({}, torch::kDouble);
  // One block outside the list ops: flags, <u, g> and (with buffers) <b, g> of its parameter.
  auto row_of = [&](const torch::Tensor& p, const torch::Tensor& g, const torch::Tensor& u,
                    const torch::Tensor& g_ok, const torch::Tensor& u_ok) {
    std::vector<torch::Tensor> entries{g_ok.to(torch::kDouble), u_ok.to(torch::kDouble),
                                       (u * g).sum(torch::kDouble)};
    if (buffers) {
      const std::optional<torch::Tensor> buf = momentum_buffer_of(p);
      entries.push_back(buf ? (*buf * g).sum(torch::kDouble) : zero.to(g.device()));
    }
    stats.push_back(torch::stack(entries));
    const int64_t row = offset;
    offset += static_cast<int64_t>(entries.size());
    return row;
  };
  for (KroneckerBlock* b : moving) {  // blocks outside the list ops: an Embedding
    if (b->listable()) continue;
    const torch::Tensor grad = grad_or_zeros(b->weight()).t();  // packed: weight^T
    const torch::Tensor grad_ok = torch::isfinite(kfac::max_abs(grad));
    torch::Tensor direction;
    try {
      direction = b->precondition_embedding(grad, damping_of(b->weight()), pi);
    } catch (const c10::Error&) {  // an op that refused a non-finite result: skip the layer
      direction = torch::full_like(grad, std::nan(""));
    }
    const torch::Tensor dir_ok = torch::isfinite(kfac::max_abs(direction));
    const torch::Tensor g = grad.t(), u = direction.t();
    const int64_t row = row_of(b->weight(), g, u, grad_ok, dir_ok);
    layers.push_back(Layer{b->name(), false, b->params(), {g}, {u}, row, 1});
  }
  for (const auto& p : plain) {  // the fallback: the plain gradient
    const torch::Tensor& g = p.grad();
    const torch::Tensor ok = torch::isfinite(kfac::max_abs(g));
    const int64_t row = row_of(p, g, g, ok, ok);
    layers.push_back(Layer{param_name(p), true, {p}, {g}, {g}, row, 1});
  }

  const std::vector<double> rows = detail::read_values(stats);
  std::vector<int64_t> offsets;
  for (const Layer& layer : layers) offsets.push_back(layer.row);
  const std::vector<int64_t> faults = kfac::direction_faults(rows, offsets);
  std::vector<Direction> updates;
  for (size_t i = 0; i < layers.size(); ++i) {
    const Layer& layer = layers[i];
    const double* row = rows.data() + layer.row;
    const kfac::Fault what = kfac::fault_of(faults[i]);
    if (what != kfac::Fault::kNone) {
      fault(layer.name, what, layer.plain ? "parameter" : "layer");
      continue;
    }
    for (size_t j = 0; j < layer.params.size(); ++j) {
      const torch::Tensor& p = layer.params[j];
      if (p.grad().defined() && p.requires_grad()) {
        const auto slot = static_cast<int64_t>(j);
        updates.push_back({p, layer.grads[j], layer.dirs[j],
                           slot < layer.slots ? row[2 + slot] : 0.0,
                           buffers && slot < layer.slots ? row[2 + layer.slots + slot] : 0.0});
      }
    }
  }
  return updates;
}

double KFAC::trust_region(std::vector<Direction>& updates) {
  const std::optional<double> kl_clip = global().kl_clip();
  if (!kl_clip.has_value() || updates.empty()) return 1.0;
  // <u, g> and <b, g> came with the directions' read (directions(): cross_wanted()); a
  // parameter without a momentum buffer contributes neither <b, g> nor a carried share.
  // kl_share stays a float64 0-d tensor on the CPU (reading it back syncs no device).
  std::vector<double> inner, cross, lr, momentum, share;
  for (const auto& u : updates) {
    const KFACOptions& o = group_options(u.param);
    double b_g = 0.0, s_p = 0.0;
    if (o.momentum() != 0.0) {
      auto it = state().find(u.param.unsafeGetTensorImpl());
      if (it != state().end()) {
        const auto& s = static_cast<const KFACParamState&>(*it->second);
        if (s.momentum_buffer().defined()) {
          b_g = u.cross;
          if (s.kl_share().defined()) s_p = s.kl_share().item<double>();
        }
      }
    }
    inner.push_back(u.inner);
    cross.push_back(b_g);
    lr.push_back(o.lr());
    momentum.push_back(o.momentum());
    share.push_back(s_p);
  }
  const kfac::TrustRegion region = kfac::trust_region(*kl_clip, inner, cross, lr, momentum, share);
  for (size_t i = 0; i < updates.size(); ++i) {
    if (momentum[i] != 0.0) {
      param_state(updates[i].param).kl_share(torch::tensor(region.kl_share[i], torch::kDouble));
    }
  }
  return region.nu;
}

void KFAC::apply(const std::vector<Direction>& updates, double nu) {
  std::unordered_map<const void*, const Direction*> by_param;
  for (const auto& u : updates) by_param[u.param.unsafeGetTensorImpl()] = &u;
  for (auto& group : param_groups()) {
    const auto& o = static_cast<const KFACOptions&>(group.options());
    std::vector<torch::Tensor> params, dirs, buffers;
    for (const auto& p : group.params()) {
      auto it = by_param.find(p.unsafeGetTensorImpl());
      if (it == by_param.end()) continue;
      params.push_back(p);
      dirs.push_back(it->second->update);
      if (o.momentum() != 0.0) {
        KFACParamState& s = param_state(p);
        if (!s.momentum_buffer().defined()) s.momentum_buffer(torch::zeros_like(p));
        buffers.push_back(s.momentum_buffer());
      }
    }
    if (params.empty()) continue;
    kfac_momentum_step_(params, buffers, dirs, o.lr(), o.momentum() * nu, o.weight_decay(), nu);
  }
}

}  // namespace natgrad::optim
