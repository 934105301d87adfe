#include "frontend/ewc.h"

#include <torch/autograd.h>
#include <torch/serialize/archive.h>

#include <cmath>
#include <map>
#include <optional>
#include <sstream>

#include "empirical/empirical_fisher.h"
#include "ewc/ewc_penalty.h"
#include "ewc/ewc_rules.h"
#include "frontend/layers.h"
#include "likelihood/likelihood.h"

namespace natgrad {
namespace {

// (targets, per-sample weight or undefined for 1): the passes whose weighted per-sample
// gradients have the requested Fisher as their summed squares (likelihood/likelihood.h).
using Pass = std::pair<at::Tensor, at::Tensor>;

std::string names_list(const std::vector<std::string>& names) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < names.size(); ++i) out << (i ? ", '" : "'") << names[i] << "'";
  out << "]";
  return out.str();
}

bool all_finite(const at::Tensor& t) {
  return t.numel() == 0 || at::isfinite(t).all().item<bool>();
}

// Σ over the samples of out (dim 0) of their NLL, optionally weighted per sample: its gradient
// w.r.t. out[n] is w_n ∇ℓ_n.
at::Tensor weighted_nll(const std::string& likelihood, const at::Tensor& out,
                        const at::Tensor& target, const at::Tensor& weight) {
  const at::Tensor per_sample = likelihood::per_sample_nll(likelihood, out, target);
  return weight.defined() ? (per_sample * weight).sum() : per_sample.sum();
}

// The label passes of fisher_type at the outputs (likelihood::pseudo_targets) as pairs.
std::vector<Pass> label_passes(const EWCOptions& o, const at::Tensor& out, const at::Tensor& y,
                               std::optional<at::Generator> gen) {
  likelihood::Passes p =
      likelihood::pseudo_targets(o.likelihood(), out, o.fisher_type(),
                                 y.defined() ? std::optional<at::Tensor>(y) : std::nullopt,
                                 o.mc_samples(), std::move(gen));
  std::vector<Pass> passes;
  for (size_t k = 0; k < p.targets.size(); ++k) {
    passes.emplace_back(p.targets[k], p.weights.defined() ? p.weights[static_cast<int64_t>(k)]
                                                          : at::Tensor());
  }
  return passes;
}

// A natgrad::nn::Linear layer whose parameters all take the linear_diag_fisher path: indices
// of its weight and bias (-1: none) in the trainable list, and its own records.
struct LinearSlot {
  nn::LinearImpl* layer;
  size_t weight;
  int64_t bias;
  std::shared_ptr<nn::LayerRecords> records;
};

// Every natgrad::nn::Linear of `model` whose parameters are all trainable.
std::vector<LinearSlot> linear_slots(torch::nn::Module& model,
                                     const std::vector<std::pair<std::string, at::Tensor>>& named) {
  auto index_of = [&](const std::string& name) -> int64_t {
    for (size_t j = 0; j < named.size(); ++j) {
      if (named[j].first == name) return static_cast<int64_t>(j);
    }
    return -1;
  };
  std::vector<LinearSlot> out;
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    auto* layer = dynamic_cast<nn::LinearImpl*>(item.value().get());
    if (layer == nullptr) continue;
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    const int64_t w = index_of(prefix + "weight");
    const int64_t b = layer->bias.defined() ? index_of(prefix + "bias") : -1;
    if (w < 0 || (layer->bias.defined() && b < 0)) continue;  // some parameter frozen
    out.push_back(
        {layer, static_cast<size_t>(w), b,
         std::make_shared<nn::LayerRecords>(
             nullptr, nn::LayerRecordsOptions{/*training_only=*/false, /*keep_output=*/true,
                                              /*hook_gradients=*/false})});
  }
  return out;
}

// Attaches each slot's records to its layer for one forward (detached on scope exit).
struct AttachGuard {
  const std::vector<LinearSlot>& slots;
  explicit AttachGuard(const std::vector<LinearSlot>& s) : slots(s) {
    for (const auto& slot : slots) slot.layer->attach(slot.records);
  }
  ~AttachGuard() {
    for (const auto& slot : slots) slot.layer->detach(slot.records);
  }
};

// Restores the model's training flag on scope exit.
struct TrainModeGuard {
  torch::nn::Module& model;
  bool was;
  TrainModeGuard(torch::nn::Module& m, bool train) : model(m), was(m.is_training()) {
    m.train(train);
  }
  ~TrainModeGuard() { model.train(was); }
};

// The differentiable penalty Σ F (θ − θ*)² over lists: value and gradient 2F(θ − θ*) come
// together from the ewc_penalty op; backward scales the stored gradient.
struct PenaltyFunction : public torch::autograd::Function<PenaltyFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList params,
                            at::TensorList fisher, at::TensorList anchor) {
    auto [value, grads] = natgrad::ewc_penalty(params, fisher, anchor);
    ctx->saved_data["grads"] = std::move(grads);
    return value;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const std::vector<at::Tensor> grads = ctx->saved_data["grads"].toTensorVector();
    torch::autograd::variable_list out(3 * grads.size());
    for (size_t t = 0; t < grads.size(); ++t) out[t] = grads[t] * grad_out[0];
    return out;
  }
};

// The batch-mean Fisher of the parameters of natgrad::nn::Linear layers called once in the
// forward that produced `out` (one row per sample): per pass, the output gradients of the
// weighted NLL summed over samples, then linear_diag_fisher (no loop over samples). Sets
// mean[j] and done[j] for those parameters.
void linear_path(const std::string& likelihood, const std::vector<LinearSlot>& linear,
                 const at::Tensor& out, const std::vector<Pass>& passes,
                 const std::vector<at::Tensor>& params, std::vector<at::Tensor>& mean,
                 std::vector<bool>& done) {
  std::vector<const LinearSlot*> used;
  std::vector<at::Tensor> outputs;
  for (const LinearSlot& slot : linear) {
    if (slot.records->calls().size() == 1) {
      used.push_back(&slot);
      outputs.push_back(slot.records->calls()[0]->output);
    }
  }
  if (used.empty()) return;
  std::vector<at::Tensor> fisher(used.size());
  for (const Pass& pass : passes) {
    const auto grads =
        torch::autograd::grad({weighted_nll(likelihood, out, pass.first, pass.second)}, outputs, {},
                              /*retain_graph=*/true, /*create_graph=*/false,
                              /*allow_unused=*/true);
    for (size_t u = 0; u < used.size(); ++u) {
      const at::Tensor g = grads[u].defined() ? grads[u].detach() : at::zeros_like(outputs[u]);
      const at::Tensor d =
          linear_diag_fisher(used[u]->records->calls()[0]->input, g, used[u]->bias >= 0, 1.0);
      fisher[u] = fisher[u].defined() ? fisher[u] + d : d;
    }
  }
  for (size_t u = 0; u < used.size(); ++u) {
    const int64_t in = params[used[u]->weight].size(1);
    mean[used[u]->weight] = fisher[u].narrow(1, 0, in).contiguous();
    done[used[u]->weight] = true;
    if (used[u]->bias >= 0) {
      mean[used[u]->bias] = fisher[u].select(1, in).contiguous();
      done[used[u]->bias] = true;
    }
  }
}

// The batch-mean Fisher of every parameter not `done`, by per-sample autograd: each sample of x
// forwarded as a batch of one, one backward per pass, squared gradients summed, over n.
void per_sample_path(const std::string& likelihood, const EWC::Forward& forward,
                     const at::Tensor& x, const std::vector<Pass>& passes,
                     const std::vector<at::Tensor>& params, const std::vector<bool>& done,
                     std::vector<at::Tensor>& mean) {
  std::vector<at::Tensor> rest;
  std::vector<size_t> index;
  for (size_t j = 0; j < params.size(); ++j) {
    if (!done[j]) {
      rest.push_back(params[j]);
      index.push_back(j);
    }
  }
  if (rest.empty()) return;
  std::vector<at::Tensor> acc(rest.size());
  const int64_t n = x.size(0);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor out_i = forward(x.narrow(0, i, 1));
    for (size_t k = 0; k < passes.size(); ++k) {
      const at::Tensor& w = passes[k].second;
      const at::Tensor loss = weighted_nll(likelihood, out_i, passes[k].first.narrow(0, i, 1),
                                           w.defined() ? w.narrow(0, i, 1) : at::Tensor());
      const auto grads =
          torch::autograd::grad({loss}, rest, {}, /*retain_graph=*/k + 1 < passes.size(),
                                /*create_graph=*/false, /*allow_unused=*/true);
      for (size_t r = 0; r < rest.size(); ++r) {
        if (!grads[r].defined()) continue;  // unused by the forward: zero Fisher
        const at::Tensor sq = grads[r].detach().square();
        acc[r] = acc[r].defined() ? acc[r].add_(sq) : sq;
      }
    }
  }
  for (size_t r = 0; r < rest.size(); ++r) {
    mean[index[r]] = acc[r].defined() ? acc[r] / n : at::zeros_like(rest[r]).detach();
  }
}

}  // namespace

void validate(const EWCOptions& o) {
  ewc::check_options(o.lambda(), o.gamma(), o.mode());
  likelihood::check_fisher_type(o.fisher_type());
  likelihood::check_name(o.likelihood());
  TORCH_CHECK(o.mc_samples() >= 1, "Invalid mc_samples: ", o.mc_samples(),
              " (expected an int >= 1)");
}

EWC::EWC(std::shared_ptr<torch::nn::Module> model, Forward forward, EWCOptions options)
    : model_(std::move(model)), forward_(std::move(forward)), options_(std::move(options)) {
  TORCH_CHECK(model_ != nullptr, "Invalid model: expected a module, got nullptr");
  TORCH_CHECK(static_cast<bool>(forward_),
              "Invalid forward: expected a callable, got an empty function");
  validate(options_);
}

std::vector<std::pair<std::string, at::Tensor>> EWC::trainable() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& item : model_->named_parameters()) {
    if (item.value().requires_grad()) out.emplace_back(item.key(), item.value());
  }
  return out;
}

void EWC::consolidate(const at::Tensor& inputs, const at::Tensor& targets,
                      std::optional<at::Generator> generator) {
  consolidate(std::vector<Batch>{{inputs, targets}}, std::move(generator));
}

void EWC::consolidate(const std::vector<Batch>& batches, std::optional<at::Generator> generator) {
  validate(options_);
  const size_t task_no = options_.mode() == "separate" ? tasks_.size() : 0;
  const std::string where = "EWC.consolidate (task " + std::to_string(task_no) + ")";
  TORCH_CHECK(!batches.empty(), where, ": data holds no samples");
  for (size_t b = 0; b < batches.size(); ++b) {  // (missing targets: see label_passes)
    const at::Tensor& y = batches[b].second;
    try {
      likelihood::check_batch(batches[b].first,
                              y.defined() ? std::optional<at::Tensor>(y) : std::nullopt);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, where, ", batch ", b, ": ", e.msg());
    }
  }
  const auto named = trainable();
  TORCH_CHECK(!named.empty(), where, ": the model has no trainable parameters");
  std::vector<at::Tensor> params;
  for (const auto& [name, p] : named) params.push_back(p);

  std::vector<at::Tensor> diag(named.size());
  std::map<std::string, std::string> estimator;
  int64_t seen = 0;
  {
    TrainModeGuard mode(*model_, options_.train_mode());
    torch::AutoGradMode grad_mode(true);
    for (size_t b = 0; b < batches.size(); ++b) {
      const std::string at_batch = where + ", batch " + std::to_string(b);
      const at::Tensor& x = batches[b].first;
      const int64_t n = x.size(0);
      // natgrad::nn::Linear layers: one batched forward records each layer's input and output;
      // their per-sample Fisher comes from linear_diag_fisher on the output gradients.
      const std::vector<LinearSlot> linear = linear_slots(*model_, named);
      at::Tensor out;
      {
        AttachGuard attached(linear);
        std::optional<torch::NoGradGuard> no_grad;
        if (linear.empty()) no_grad.emplace();
        out = forward_(x);
      }
      std::vector<Pass> passes;
      try {  // the likelihood's errors, named with the task and batch
        if (batches[b].second.defined())
          likelihood::check_targets(options_.likelihood(), out, batches[b].second);
        passes = label_passes(options_, out.detach(), batches[b].second, generator);
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, at_batch, ": ", e.msg());
      }
      std::vector<at::Tensor> mean(params.size());
      std::vector<bool> done(params.size(), false);
      linear_path(options_.likelihood(), linear, out, passes, params, mean, done);
      out = at::Tensor();
      per_sample_path(options_.likelihood(), forward_, x, passes, params, done, mean);
      for (size_t j = 0; j < params.size(); ++j) {
        estimator[named[j].first] = done[j] ? "linear_diag_fisher" : "per-sample autograd";
        diag[j] = ewc::running_mean(diag[j], mean[j], n, seen);
      }
      seen += n;
    }
  }
  std::vector<std::string> bad;
  for (size_t j = 0; j < named.size(); ++j) {
    if (!all_finite(diag[j])) bad.push_back(named[j].first);
  }
  TORCH_CHECK(bad.empty(), where, ": the Fisher of ", names_list(bad),
              " is not finite (NaN/Inf gradients at the current parameters?); nothing was stored");

  Task task;
  for (size_t j = 0; j < named.size(); ++j) {
    task.names.push_back(named[j].first);
    task.fisher.push_back(diag[j].contiguous());
    task.anchor.push_back(named[j].second.detach().clone());
  }
  if (options_.mode() == "online" && !tasks_.empty()) {
    const Task& old = tasks_[0];
    for (size_t j = 0; j < task.names.size(); ++j) {
      for (size_t k = 0; k < old.names.size(); ++k) {
        if (old.names[k] == task.names[j] && old.fisher[k].sizes() == task.fisher[j].sizes()) {
          task.fisher[j] = ewc::online_merge(options_.gamma(), old.fisher[k], task.fisher[j]);
        }
      }
    }
    tasks_ = {std::move(task)};
  } else {
    tasks_.push_back(std::move(task));
  }
  estimator_ = std::move(estimator);
  ++revision_;
}

at::Tensor EWC::penalty() const {
  const auto all = model_->named_parameters();
  TORCH_CHECK(all.size() > 0, "EWC.penalty: the model has no parameters");
  at::Tensor total = at::zeros({}, all[0].value().options().requires_grad(false));
  for (size_t t = 0; t < tasks_.size(); ++t) {
    const Task& task = tasks_[t];
    std::vector<std::string> missing;
    for (const auto& name : task.names) {
      if (all.find(name) == nullptr) missing.push_back(name);
    }
    TORCH_CHECK(missing.empty(),
                "consolidated parameters no longer exist in the model: ", names_list(missing));
    std::vector<at::Tensor> params;
    for (size_t j = 0; j < task.names.size(); ++j) {
      const at::Tensor& p = all[task.names[j]];
      TORCH_CHECK(p.sizes() == task.anchor[j].sizes(), "parameter '", task.names[j],
                  "' changed shape since consolidation: ", task.anchor[j].sizes(), " -> ",
                  p.sizes());
      params.push_back(p);
    }
    if (!params.empty()) {
      total = total + PenaltyFunction::apply(at::TensorList(params), at::TensorList(task.fisher),
                                             at::TensorList(task.anchor));
    }
  }
  return 0.5 * options_.lambda() * total;
}

at::Tensor EWC::fisher(const std::string& name, size_t task) const {
  TORCH_CHECK(task < tasks_.size(), "EWC.fisher: task ", task, " does not exist (", tasks_.size(),
              " stored)");
  const Task& t = tasks_[task];
  for (size_t j = 0; j < t.names.size(); ++j) {
    if (t.names[j] == name) return t.fisher[j];
  }
  TORCH_CHECK(false, "EWC.fisher: no parameter '", name, "' in task ", task);
}

}  // namespace natgrad
