// The Kronecker curvature block of one natgrad::nn layer for natgrad::optim::KFAC: the C++
// counterpart of python/natgrad/curvature/kron.py's LinearBlock ("expand"), Conv2dBlock and
// EmbeddingBlock, calling the same csrc ops (factors/kron_factors.h, linalg/psd_linalg.h,
// precondition/kfac_precondition.h) and the shared rules (kfac/kfac_rules.h). Policy (when to
// update, skip, decompose) is the optimizer's; this class only turns captured calls into factor
// updates and decompositions.
#pragma once

#include <torch/nn/module.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "frontend/layers.h"

namespace natgrad::optim::detail {

/// One factor update's data in the ops' layout (kron.py's Statistics).
struct KroneckerStatistics {
  torch::Tensor inputs;
  torch::Tensor grads;
  double grad_scale = 1.0;  // per-sample scale x sqrt(positions x passes)
  int64_t input_rows = 0;
  int64_t grad_rows = 0;
};

/// F ≈ A ⊗ G over one layer's weight (+ bias); state keys as in Python ("A", "G",
/// "a_eigenvalues", "a_eigenvectors", "g_eigenvalues", "g_eigenvectors", "a_inverse",
/// "g_inverse"; an Embedding keeps A as a vector and only G's eigendecomposition).
class KroneckerBlock {
 public:
  enum class Kind { kLinear, kConv2d, kEmbedding };

  /// The block of `module` (a natgrad::nn layer) named `name` in the model, or the reason it
  /// cannot have one (grouped or non-zero-padded Conv2d, sparse or max_norm Embedding).
  static std::optional<std::string> unsupported_reason(torch::nn::Module& module);
  KroneckerBlock(std::string name, std::shared_ptr<torch::nn::Module> module);

  const std::string& name() const { return name_; }
  Kind kind() const { return kind_; }
  const torch::Tensor& weight() const { return weight_; }
  const torch::Tensor& bias() const { return bias_; }  // undefined without bias
  /// weight (and bias), the parameters this block covers, in order.
  std::vector<torch::Tensor> params() const;
  nn::CaptureLayer& layer() const { return *layer_; }
  /// "K-FAC linear (expand)", "K-FAC conv2d" or "K-FAC embedding" (describe()).
  std::string description() const;

  bool has_factors() const { return state.count("A") > 0; }
  bool has_inverse() const;
  /// Whether the list ops (kfac_directions_*) serve this block (Linear and Conv2d).
  bool listable() const { return kind_ != Kind::kEmbedding && has_inverse(); }

  int64_t a_dim() const;
  int64_t g_dim() const;
  /// Samples in the calls' inputs (dim 0; an unbatched input is one sample).
  int64_t count_samples(const std::vector<torch::Tensor>& inputs) const;
  /// Rows (samples x weight-sharing positions) of the calls (kfac::linear_rows, conv_rows,
  /// embedding_rows).
  int64_t count_rows(const std::vector<torch::Tensor>& inputs) const;
  /// kfac::sample_scale of the calls; batch: the step's samples (0: not known).
  double sample_scale(const std::vector<torch::Tensor>& inputs, const std::string& loss_reduction,
                      int64_t batch = 0) const;

  KroneckerStatistics prepare(const std::vector<torch::Tensor>& inputs,
                              const std::vector<torch::Tensor>& grads, double grad_scale) const;
  /// kfac::statistics_ok: every value finite and small enough that no Gram sum can overflow.
  torch::Tensor statistics_ok(const KroneckerStatistics& stats) const;
  /// The EMA update (the first update replaces).
  void apply_update(const KroneckerStatistics& stats, double decay);
  /// Decomposes the factors through the ladder; returns the rung used.
  int64_t update_inverse(const std::string& method, double damping, bool pi_correction);
  /// An Embedding block's (A ⊗ G + γI)⁻¹ on its packed gradient (weightᵀ, [dim, num]).
  torch::Tensor precondition_embedding(const torch::Tensor& packed, double damping,
                                       bool pi_correction) const;
  /// Every state entry this block can hold and its shape (checked when loading).
  std::map<std::string, std::vector<int64_t>> expected_shapes() const;

  std::map<std::string, torch::Tensor> state;

 private:
  void ensure_factors();

  std::string name_;
  Kind kind_;
  std::shared_ptr<torch::nn::Module> module_;
  nn::CaptureLayer* layer_;
  torch::Tensor weight_, bias_;
};

}  // namespace natgrad::optim::detail
