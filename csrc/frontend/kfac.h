// natgrad::optim::KFAC: K-FAC (Martens & Grosse, 2015; KFC for convolutions, Grosse & Martens,
// 2016) as a torch::optim::Optimizer for LibTorch programs.
//
// The update rule is natgrad.KFAC's (python/natgrad/optim/kfac.py), with the numeric rules
// both share in kfac/kfac_rules.h: every
// natgrad::nn layer (Linear, Conv2d, Embedding; csrc/frontend/layers.h) gets a Kronecker block
// F ≈ A ⊗ G whose factors are running averages (factor_decay) refreshed every
// factor_update_period steps from the inputs and output gradients the layer records, and
// decomposed every inverse_update_period steps through the ops' fallback ladder. Each step,
//   u = (A ⊗ G + γI)⁻¹ ∇W   (eigenbasis, or π-corrected factored damping, or damped inverses),
//   θ ← θ − η b,  b ← ν(μ b + u) + ω θ,
// where the KL trust region ν = min(1, sqrt(κ / (η² (μ² s + 2μ⟨b, g⟩ + ⟨u, g⟩)))) bounds the
// momentum-accumulated step (s = bᵀ F b carried per parameter as "kl_share").
//
// Every other parameter (a plain torch::nn::Linear, a LayerNorm, a free parameter) and every
// layer before its first decomposition takes the plain gradient in place of u, with the same
// trust region, momentum and weight decay; describe() names each parameter's treatment.
// Faults: a layer whose recorded inputs/gradients (or whose gradient or direction) hold
// NaN/Inf, or values that could overflow a factor, is skipped for the step with its factors
// and parameters untouched; a TORCH_WARN names it once and nonfinite_skips() counts.
//
// The factors use the empirical Fisher of the training loss: call loss.backward() on the loss
// of the forward pass that the layers recorded, then step(). The layers record only while the
// current step updates factors, in training mode, with grad enabled.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "frontend/kfac_blocks.h"
#include "frontend/kfac_options.h"
#include "frontend/layers.h"
#include "kfac/kfac_rules.h"

namespace natgrad::optim {

class KFAC : public torch::optim::Optimizer {
 public:
  /// All parameters of `model` in one group with `defaults`.
  KFAC(std::shared_ptr<torch::nn::Module> model, const KFACOptions& defaults = {});
  /// The given groups (a group without options takes `defaults`); parameters outside every
  /// natgrad::nn layer, or in a layer only some of whose parameters are listed, take the plain
  /// gradient.
  KFAC(std::shared_ptr<torch::nn::Module> model,
       const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
       const KFACOptions& defaults = {});
  /// Convenience for TORCH_MODULE holders (e.g. a torch::nn::Sequential).
  template <typename M>
  KFAC(const torch::nn::ModuleHolder<M>& model, const KFACOptions& defaults = {})
      : KFAC(std::static_pointer_cast<torch::nn::Module>(model.ptr()), defaults) {}

  KFAC(KFAC&&) = delete;  // the layers' records refer to this optimizer
  KFAC& operator=(KFAC&&) = delete;
  ~KFAC() override;

  /// torch::optim's, keeping the group's own KFACOptions (checked; an invalid group is not
  /// added). Its parameters take the plain gradient (no layer was built for them).
  void add_param_group(const torch::optim::OptimizerParamGroup& param_group);

  /// One K-FAC step; `closure` (re-evaluating the loss with grad enabled) is optional.
  /// Returns the closure's loss (undefined without a closure).
  torch::Tensor step(LossClosure closure = nullptr) override;

  /// The table of every optimized parameter and its preconditioner (as natgrad.KFAC's).
  std::string describe() const;
  /// How many times each layer's (or parameter's) update was skipped for NaN/Inf/overflow.
  std::map<std::string, int64_t> nonfinite_skips() const { return faults_; }
  /// Steps taken so far.
  int64_t steps() const { return steps_; }
  /// Stops recording in every layer: factors are no longer updated (as natgrad.KFAC's
  /// remove_hooks; also done by the destructor).
  void remove_hooks();

  /// torch::optim's state (momentum buffers, kl_share, param groups) plus, under "kfac", the
  /// step counter, fault and ladder counts, decomposed layers and every block's factors and
  /// decompositions: loading into a fresh optimizer over the same model resumes exactly.
  void save(torch::serialize::OutputArchive& archive) const override;
  /// Restores save()'s output (validated first: on error the optimizer is unchanged).
  void load(torch::serialize::InputArchive& archive) override;

  /// The curvature blocks, in model order (tests and introspection).
  const std::vector<std::unique_ptr<detail::KroneckerBlock>>& blocks() const { return blocks_; }

 private:
  struct Direction {  // one moving parameter's u, g, <u, g> and <b, g> (b: momentum buffer)
    torch::Tensor param, grad, update;
    double inner = 0.0;
    double cross = 0.0;  // read with the directions when the trust region bounds momentum
  };

  void build(const std::shared_ptr<torch::nn::Module>& model);
  const KFACOptions& global() const;
  const KFACOptions& group_options(const torch::Tensor& p) const;
  void index_groups();
  void restore_group_options(size_t index, const torch::optim::OptimizerParamGroup& group);
  bool capturing() const;
  void clear_records();
  std::set<std::string> update_factors(int64_t k);
  void update_inverses(int64_t k);
  std::vector<Direction> directions(const std::set<std::string>& skipped);
  bool cross_wanted() const;
  std::optional<torch::Tensor> momentum_buffer_of(const torch::Tensor& p) const;
  double trust_region(std::vector<Direction>& updates);
  void apply(const std::vector<Direction>& updates, double nu);
  void fault(const std::string& where, kfac::Fault what, const std::string& kind = "layer");
  double damping_of(const torch::Tensor& p) const;
  std::string param_name(const torch::Tensor& p) const;
  std::string plain_reason(const torch::Tensor& p) const;
  KFACParamState& param_state(const torch::Tensor& p);

  std::vector<std::unique_ptr<detail::KroneckerBlock>> blocks_;
  std::vector<std::shared_ptr<nn::LayerRecords>> records_;  // one per block
  std::unordered_map<const void*, size_t> block_of_;        // TensorImpl* -> block index
  std::unordered_map<const void*, size_t> group_of_;        // TensorImpl* -> group index
  std::unordered_map<const void*, std::string> names_;      // parameter names
  std::unordered_map<const void*, std::string> fallback_reason_;
  int64_t steps_ = 0;
  std::map<std::string, int64_t> faults_;
  std::map<std::string, int64_t> ladder_;
  std::set<std::string> decomposed_;
};

}  // namespace natgrad::optim
