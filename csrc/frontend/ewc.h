// natgrad::EWC: elastic weight consolidation for LibTorch C++ training loops, the C++ twin of
// python/natgrad/regularizers/ewc.py (diagonal structure), on the same ops.
#pragma once

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/archive.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace natgrad {

// Options of natgrad::EWC, in torch::optim::AdamOptions' style (chained setters). Every value
// is validated when the EWC is constructed (and when a checkpoint is loaded): an invalid one
// raises c10::Error naming the option and the value.
struct EWCOptions {
  // lambda: the penalty's weight λ >= 0 (finite).
  /* implicit */ EWCOptions(double lambda = 1.0) : lambda_(lambda) {}
  // λ >= 0: the penalty is (λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)².
  TORCH_ARG(double, lambda) = 1.0;
  // "separate" (one (F, θ*) per task) or "online" (F ← γF + F_new, θ* ← the latest parameters).
  TORCH_ARG(std::string, mode) = "separate";
  // γ in [0, 1]: decay of the online Fisher.
  TORCH_ARG(double, gamma) = 1.0;
  // Which labels the Fisher is taken under: "empirical" (the observed targets), "mc" (labels
  // sampled from the model's predictive distribution) or "exact" (the expectation over it).
  TORCH_ARG(std::string, fisher_type) = "empirical";
  // "categorical" (logits [n, ..., C], integer targets) or "gaussian" (unit-variance means,
  // floating targets of the outputs' shape: ½‖y − f‖² per sample).
  TORCH_ARG(std::string, likelihood) = "categorical";
  // Estimate in training mode (default: eval mode, the sound choice with BatchNorm/Dropout).
  TORCH_ARG(bool, train_mode) = false;
  // Label draws per sample for fisher_type "mc" (>= 1).
  TORCH_ARG(int64_t, mc_samples) = 1;
};

// Elastic weight consolidation with a per-sample diagonal Fisher (Kirkpatrick et al. 2017) and
// online EWC (Schwarz et al. 2018).
//
// consolidate() estimates, at the current parameters θ*, the diagonal Fisher
//   F = (1/N) Σ_n (∇_θ ℓ_n)²   (the mean over samples of SQUARED PER-SAMPLE gradients, never the
//                               square of the batch-mean gradient),
// with ℓ_n the negative log-likelihood of sample n under the chosen labels, and stores (F, θ*)
// for every trainable parameter. penalty() returns (λ/2) Σ_tasks Σ_i F_i (θ_i − θ*_i)², a
// differentiable scalar (its gradient λ F (θ − θ*) comes from the ewc_penalty op together with
// the value) to add to the next task's loss. Semantics, conventions and errors are those of
// natgrad.EWC (structure="diagonal"); the tests compare it with the Python package.
//
// How the Fisher is computed: parameters of natgrad::nn::Linear layers (the capture layers of
// csrc/frontend/layers.h) that are called once per forward come from the recorded layer input and
// output gradient through the linear_diag_fisher op (no loop over samples); every other
// parameter by per-sample autograd: one forward of each sample as a batch of one and one
// backward per label pass (a loop over samples: O(N) small passes, documented cost).
//
// Modes: "separate" appends one task per consolidate(); "online" keeps one task,
// F ← γ F_old + F_new (per parameter present in both) and θ* ← the latest parameters.
// Parameters created after a consolidation are not penalised; a consolidated parameter that no
// longer exists or changed shape makes penalty() raise.
//
// With natgrad::optim::KFAC: add penalty() to the loss as usual (its gradient joins .grad and is
// preconditioned; K-FAC's statistics come from the data term only). Consolidate in eval mode
// (the default): with train_mode(true), a KFAC attached to the same layers would record
// consolidate()'s forward and gradient passes into its next step's factors (as in Python).
//
// Bad input never reaches the stored Fisher: non-finite inputs/targets or a non-finite Fisher
// raise c10::Error naming the task ("EWC.consolidate (task k)") and what was not finite, and
// leave this object unchanged.
class EWC {
 public:
  // The model's forward as a function of one input batch.
  using Forward = std::function<at::Tensor(const at::Tensor&)>;
  // One (inputs, targets) batch.
  using Batch = std::pair<at::Tensor, at::Tensor>;

  // A model and its forward (any module; e.g. [&](auto& x) { return net->forward(x); }).
  EWC(std::shared_ptr<torch::nn::Module> model, Forward forward, EWCOptions options = {});

  // A module whose forward takes one tensor (torch::nn::Sequential, your own ...Impl).
  template <typename ModuleType>
  EWC(const std::shared_ptr<ModuleType>& model, EWCOptions options = {})
      : EWC(
            std::static_pointer_cast<torch::nn::Module>(model),
            [m = model.get()](const at::Tensor& x) -> at::Tensor { return m->forward(x); },
            std::move(options)) {}

  // A module holder (torch::nn::Sequential, TORCH_MODULE(...) types).
  template <typename Impl>
  EWC(const torch::nn::ModuleHolder<Impl>& model, EWCOptions options = {})
      : EWC(model.ptr(), std::move(options)) {}

  // Estimates the Fisher on one batch of a task's data at the current parameters and stores
  // it with the parameters as anchor. targets may be undefined for fisher_type "mc"/"exact".
  // generator: for "mc" (default: the global CPU generator).
  void consolidate(const at::Tensor& inputs, const at::Tensor& targets,
                   std::optional<at::Generator> generator = std::nullopt);

  // The same over several batches of one task: the Fisher is the mean over all their samples.
  void consolidate(const std::vector<Batch>& batches,
                   std::optional<at::Generator> generator = std::nullopt);

  // (λ/2) Σ_tasks Σ F (θ − θ*)², differentiable w.r.t. the model's parameters; a 0-dim zero of
  // the parameters' dtype before any consolidation.
  at::Tensor penalty() const;

  // The options (set lambda() etc. between tasks; mode/fisher_type/likelihood are re-checked
  // at the next consolidate()).
  const EWCOptions& options() const { return options_; }
  EWCOptions& options() { return options_; }

  // One consolidated task: parameter names (model->named_parameters() keys), Fisher and anchor.
  struct Task {
    std::vector<std::string> names;
    std::vector<at::Tensor> fisher;
    std::vector<at::Tensor> anchor;
  };
  // The stored tasks (one in online mode).
  const std::vector<Task>& tasks() const { return tasks_; }
  // The stored Fisher of parameter `name` in task `task` (c10::Error if absent).
  at::Tensor fisher(const std::string& name, size_t task = 0) const;
  // How the last consolidate() estimated each parameter's Fisher: "linear_diag_fisher" (a
  // natgrad::nn::Linear layer called once per forward) or "per-sample autograd".
  const std::map<std::string, std::string>& estimator() const { return estimator_; }
  // Bumped whenever the stored Fisher changes.
  int64_t revision() const { return revision_; }

  // Options and every task into / from a torch::serialize archive (also torch::save/load).
  // load() validates everything (finite floating tensors, consistent shapes, valid options)
  // before replacing anything.
  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);

 private:
  std::vector<std::pair<std::string, at::Tensor>> trainable() const;

  std::shared_ptr<torch::nn::Module> model_;
  Forward forward_;
  EWCOptions options_;
  std::vector<Task> tasks_;
  std::map<std::string, std::string> estimator_;
  int64_t revision_ = 0;
};

// Checks every option, raising c10::Error naming the first invalid one.
void validate(const EWCOptions& options);

// torch::save(ewc, path) / torch::load(ewc, path).
torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive,
                                            const EWC& ewc);
torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive, EWC& ewc);

}  // namespace natgrad
