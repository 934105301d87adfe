// The output distributions natgrad's Fisher estimates are taken under, written once for both
// frontends: natgrad.likelihoods (Python, through the torch.ops.natgrad.likelihood_* ops) and
// natgrad::EWC (the C++ frontend, calling these functions directly).
//
// Every Fisher natgrad computes for a model is a mean over samples of outer products of
// gradients of per-sample negative log-likelihoods l(f(x), y). For each likelihood this file
// holds the validation of targets against outputs, the per-sample NLL, label sampling from the
// predictive distribution, and the (targets, weight) passes whose weighted gradients w * grad l
// have the requested Fisher as their summed outer products:
//   "empirical"  the observed targets, weight 1;
//   "mc"         `draws` sampled labels, each with weight 1/sqrt(draws);
//   "exact"      categorical: one pass per class c with weight sqrt(p_c); unit Gaussian: one
//                pass per output element k with target f - e_k; Bernoulli: one pass per output
//                element k with target p - sqrt(p_k (1 - p_k)) e_k, p = sigmoid(f).
//
//   categorical  logits [n, ..., C], integer class targets [n, ...] (cross-entropy)
//   gaussian     means [n, ...] of a unit-variance Gaussian, targets of the same shape
//                (1/2 |y - f|^2 per sample, the MSE loss up to its reduction)
//   bernoulli    logits [n, ...] of independent Bernoulli outputs, targets in [0, 1] of the
//                same shape (binary cross-entropy with logits, summed per sample)
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace natgrad::likelihood {

// TORCH_CHECK_VALUE that `likelihood` is "categorical", "gaussian" or "bernoulli".
void check_name(const std::string& likelihood);

// TORCH_CHECK_VALUE that `fisher_type` is "empirical", "mc" or "exact".
void check_fisher_type(const std::string& fisher_type);

// TORCH_CHECK_VALUE that one batch of a Fisher estimate holds data: a non-empty batch of inputs,
// finite when floating point, and targets (when given) with one entry per input, finite when
// floating point; messages name `what` (the inputs' name). Values of meta tensors are not read.
void check_batch(const at::Tensor& inputs, const std::optional<at::Tensor>& targets,
                 const std::string& what = "inputs");

// TORCH_CHECK_VALUE that `target` fits `output` ([n, ...]) under the likelihood: one entry per
// sample, the dtype, shape and (categorical) class range; messages name `what`.
void check_targets(const std::string& likelihood, const at::Tensor& output,
                   const at::Tensor& target, const std::string& what = "targets");

// The NLL (up to constants) of each sample, summed over its positions: [n]. Differentiable.
at::Tensor per_sample_nll(const std::string& likelihood, const at::Tensor& output,
                          const at::Tensor& target);

// Labels drawn from the predictive distribution at `output` (no gradient; for meta outputs,
// uninitialised labels of the right shape and dtype). Categorical labels
// are drawn on the CPU from float32 probabilities and Gaussian noise is float32, so that a CPU
// generator gives the same labels for any device and dtype of the outputs. NaN/Inf outputs
// draw from finite stand-ins (nan_to_num): the statistics they feed stay non-finite, and each
// caller's finiteness check rejects them with its own error.
at::Tensor sample(const std::string& likelihood, const at::Tensor& output,
                  std::optional<at::Generator> generator = std::nullopt);

// The passes of one Fisher estimate: targets[k] and, when `weights` is defined, the per-sample
// gradient weights weights[k] ([passes, n]; undefined means weight 1 for every pass).
struct Passes {
  std::vector<at::Tensor> targets;
  at::Tensor weights;
};

// The passes of fisher_type ("empirical", "mc" or "exact"; see the file comment) at `output`
// (detached for "mc" and "exact"). `targets` is required (and checked) for "empirical" only;
// `mc_samples` (>= 1) is the number of draws for "mc".
Passes pseudo_targets(const std::string& likelihood, const at::Tensor& output,
                      const std::string& fisher_type, const std::optional<at::Tensor>& targets,
                      int64_t mc_samples, std::optional<at::Generator> generator = std::nullopt);

}  // namespace natgrad::likelihood
