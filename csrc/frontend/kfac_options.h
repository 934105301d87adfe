// Options and per-parameter state of natgrad::optim::KFAC (in torch::optim::AdamOptions' style),
// and their checks (natgrad.KFAC's bounds; a violated bound throws c10::Error naming the option
// and its value).
#pragma once

#include <torch/arg.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <optional>
#include <string>

namespace natgrad::optim {

/// Hyperparameters of natgrad::optim::KFAC; the meaning of each is natgrad.KFAC's (Python).
///
/// Per parameter group (an OptimizerParamGroup may carry its own KFACOptions): lr, momentum,
/// weight_decay, damping. The other options are the optimizer's and are read from the options
/// the optimizer was built with (its defaults()).
struct KFACOptions : public torch::optim::OptimizerCloneableOptions<KFACOptions> {
  /// lr: the learning rate η (default 0.01).
  KFACOptions(double lr = 0.01);
  /// Learning rate η >= 0.
  TORCH_ARG(double, lr) = 0.01;
  /// Heavy-ball momentum μ in [0, 1) (default 0.9).
  TORCH_ARG(double, momentum) = 0.9;
  /// ω >= 0, added to the preconditioned direction (default 0).
  TORCH_ARG(double, weight_decay) = 0.0;
  /// Tikhonov damping γ > 0 (default 1e-3).
  TORCH_ARG(double, damping) = 1e-3;
  /// EMA decay ρ of the Kronecker factors in [0, 1) (default 0.95).
  TORCH_ARG(double, factor_decay) = 0.95;
  /// Steps between factor updates, >= 1 (default 1).
  TORCH_ARG(int64_t, factor_update_period) = 1;
  /// Steps between decompositions, >= 1 (default 10).
  TORCH_ARG(int64_t, inverse_update_period) = 10;
  /// KL trust-region size κ > 0; std::nullopt disables it (default 1e-3).
  TORCH_ARG(std::optional<double>, kl_clip) = 1e-3;
  /// "eigen" (eigenbasis, exact damping) or "inverse" (damped inverses; the damping enters
  /// at inverse updates) (default "eigen").
  TORCH_ARG(std::string, inverse_method) = "eigen";
  /// π-corrected factored damping; std::nullopt: on for "inverse", off for "eigen".
  TORCH_ARG(std::optional<bool>, pi_correction) = std::nullopt;
  /// "mean" (the loss averages over dim 0 of the layers' inputs), "sum", or "token_mean" (a
  /// mean over every position of every sample) (default "mean").
  TORCH_ARG(std::string, loss_reduction) = "mean";

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override;
  void set_lr(const double lr) override;
  /// Whether π correction is on (resolves the std::nullopt default).
  bool pi_correction_enabled() const;
  friend bool operator==(const KFACOptions& lhs, const KFACOptions& rhs);
};

/// Per-parameter state: the momentum buffer b and the trust region's carried share of
/// b^T F b ("kl_share", float64 0-d), as in natgrad.KFAC's ``state[p]``.
struct KFACParamState : public torch::optim::OptimizerCloneableParamState<KFACParamState> {
  TORCH_ARG(torch::Tensor, momentum_buffer);
  TORCH_ARG(torch::Tensor, kl_share);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

/// Throws c10::Error naming the first invalid option (every option when `group` is false;
/// only the per-group ones, named "... in param group i", when it is a group's index).
void check_options(const KFACOptions& options, std::optional<size_t> group = std::nullopt);

}  // namespace natgrad::optim
