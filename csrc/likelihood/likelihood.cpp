// The likelihoods' rules (see likelihood.h) and their torch.ops.natgrad.likelihood_* ops.
#include "likelihood/likelihood.h"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <tuple>

namespace natgrad::likelihood {
namespace {

// A shape as Python writes a tuple: "(2, 3)", "(5,)", "()".
std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// A dtype as Python writes it: "torch.float32".
std::string dtype_str(at::ScalarType dtype) { return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

// [n, ...] -> [n], summing each sample's positions (flatten(1) is defined for n = 0 too).
at::Tensor sum_per_sample(const at::Tensor& values) {
  return values.dim() > 1 ? values.flatten(1).sum(1) : values;
}

// Whether floating-point `t` holds a NaN or Inf (false for a meta tensor, which has no values).
bool has_nonfinite(const at::Tensor& t) {
  if (!t.is_floating_point() || t.device().type() == at::kMeta) return false;
  return !at::isfinite(t).all().item<bool>();
}

bool is_categorical(const std::string& likelihood) {
  check_name(likelihood);
  return likelihood == "categorical";
}

// "Gaussian" or "Bernoulli": the name in messages about same-shape targets.
std::string display_name(const std::string& likelihood) {
  return likelihood == "gaussian" ? "Gaussian" : "Bernoulli";
}

}  // namespace

void check_name(const std::string& likelihood) {
  TORCH_CHECK_VALUE(likelihood == "categorical" || likelihood == "gaussian" || likelihood == "bernoulli",
                    "Invalid likelihood: '", likelihood,
                    "' (expected one of 'categorical', 'gaussian', 'bernoulli')");
}

void check_batch(const at::Tensor& inputs, const std::optional<at::Tensor>& targets,
                 const std::string& what) {
  TORCH_CHECK_VALUE(inputs.defined(), what, " must be a defined tensor");
  TORCH_CHECK_VALUE(inputs.dim() > 0 && inputs.size(0) > 0, what, " holds no samples (shape ",
                    shape_str(inputs.sizes()), "); at least one is needed");
  TORCH_CHECK_VALUE(!has_nonfinite(inputs), what, " hold NaN or Inf");
  if (!targets.has_value() || !targets->defined()) return;
  const at::Tensor& y = *targets;
  TORCH_CHECK_VALUE(y.dim() > 0 && y.size(0) == inputs.size(0),
                    "targets must have one entry per input: got shape ", shape_str(y.sizes()),
                    " for ", inputs.size(0), " inputs");
  TORCH_CHECK_VALUE(!has_nonfinite(y), "targets hold NaN or Inf");
}

void check_fisher_type(const std::string& fisher_type) {
  TORCH_CHECK_VALUE(fisher_type == "empirical" || fisher_type == "mc" || fisher_type == "exact",
                    "Invalid fisher_type: '", fisher_type,
                    "' (expected one of 'empirical', 'mc', 'exact')");
}

void check_targets(const std::string& likelihood, const at::Tensor& output,
                   const at::Tensor& target, const std::string& what) {
  const bool categorical = is_categorical(likelihood);
  TORCH_CHECK_VALUE(output.dim() > 0,
                    "the model's output must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(target.dim() > 0 && target.size(0) == output.size(0), what,
                    " must have one entry per sample: got shape ", shape_str(target.sizes()),
                    " for outputs of shape ", shape_str(output.sizes()));
  if (categorical) {
    TORCH_CHECK_VALUE(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), what,
                      " must hold integer class indices for the categorical likelihood, got dtype ",
                      dtype_str(target.scalar_type()));
    const at::IntArrayRef classless = output.sizes().slice(0, output.dim() - 1);
    TORCH_CHECK_VALUE(target.sizes() == classless, what, " must have shape ", shape_str(classless),
                      " (the logits' shape without the class dim) for logits ",
                      shape_str(output.sizes()), ", got ", shape_str(target.sizes()));
    if (target.numel() > 0 && target.device().type() != at::kMeta) {
      const int64_t low = target.min().item<int64_t>(), high = target.max().item<int64_t>();
      TORCH_CHECK_VALUE(low >= 0 && high < output.size(-1), what,
                        " must be class indices in [0, ", output.size(-1), "), got values in [",
                        low, ", ", high, "]");
    }
    return;
  }
  const std::string name = display_name(likelihood);
  TORCH_CHECK_VALUE(target.is_floating_point(), what, " must be floating point for the ", name,
                    " likelihood, got ", dtype_str(target.scalar_type()));
  TORCH_CHECK_VALUE(target.sizes() == output.sizes(), what, " must have the outputs' shape ",
                    shape_str(output.sizes()), " for the ", name, " likelihood, got ",
                    shape_str(target.sizes()),
                    " (broadcasting would silently change the Fisher; reshape one of them)");
}

at::Tensor per_sample_nll(const std::string& likelihood, const at::Tensor& output,
                          const at::Tensor& target) {
  if (is_categorical(likelihood)) {
    const int64_t classes = output.size(-1);
    const at::Tensor per_row = at::cross_entropy_loss(output.reshape({-1, classes}),
                                                      target.reshape({-1}), {}, at::Reduction::None);
    return sum_per_sample(per_row.reshape(output.sizes().slice(0, output.dim() - 1)));
  }
  if (likelihood == "bernoulli") {
    return sum_per_sample(
        at::binary_cross_entropy_with_logits(output, target, {}, {}, at::Reduction::None));
  }
  return sum_per_sample(0.5 * (output - target).pow(2));
}

at::Tensor sample(const std::string& likelihood, const at::Tensor& output,
                  std::optional<at::Generator> generator) {
  const at::Tensor out = output.detach();
  if (is_categorical(likelihood)) {
    if (out.device().type() == at::kMeta) {  // shapes only: labels of the right shape
      return at::empty(out.sizes().slice(0, out.dim() - 1), out.options().dtype(at::kLong));
    }
    const at::Tensor logits = at::nan_to_num(out.reshape({-1, out.size(-1)}).to(at::kFloat));
    const at::Tensor probs = at::softmax(logits, -1).cpu();
    return at::multinomial(probs, 1, /*replacement=*/false, generator)
        .reshape(out.sizes().slice(0, out.dim() - 1))
        .to(out.device());
  }
  if (likelihood == "bernoulli") {
    if (out.device().type() == at::kMeta) return at::empty_like(out);
    const at::Tensor probs = at::sigmoid(at::nan_to_num(out).to(at::kFloat)).cpu();
    return at::bernoulli(probs, generator).to(out.options());
  }
  const at::Tensor noise = at::randn(out.sizes(), generator, at::TensorOptions().dtype(at::kFloat));
  return at::nan_to_num(out) + noise.to(out.options());
}

Passes pseudo_targets(const std::string& likelihood, const at::Tensor& output,
                      const std::string& fisher_type, const std::optional<at::Tensor>& targets,
                      int64_t mc_samples, std::optional<at::Generator> generator) {
  const bool categorical = is_categorical(likelihood);
  check_fisher_type(fisher_type);
  Passes passes;
  if (fisher_type == "empirical") {
    TORCH_CHECK_VALUE(targets.has_value() && targets->defined(),
                      "targets are required for fisher_type='empirical'");
    check_targets(likelihood, output, *targets);
    passes.targets.push_back(*targets);
    return passes;
  }
  const at::Tensor out = output.detach();
  TORCH_CHECK_VALUE(out.dim() > 0,
                    "the model's output must have a batch dimension, got a 0-d tensor");
  const int64_t n = out.size(0);
  if (fisher_type == "exact") {
    if (categorical) {
      TORCH_CHECK_VALUE(out.dim() == 2,
                        "fisher_type='exact' with the categorical likelihood needs logits "
                        "[n, classes], got ",
                        shape_str(out.sizes()));
      const at::Tensor probs = at::softmax(out, -1);
      for (int64_t c = 0; c < out.size(1); ++c) {
        passes.targets.push_back(at::full({n}, c, out.options().dtype(at::kLong)));
      }
      passes.weights = probs.t().sqrt();  // [classes, n]: sqrt(p_c) per sample
      return passes;
    }
    // E[(y - f)(y - f)^T] = I: one pass per output element k, target f - e_k (gradient J^T e_k).
    // Bernoulli: E[(y - p)(y - p)^T] = diag(p (1 - p)): target p - sqrt(p_k (1 - p_k)) e_k.
    const int64_t size = c10::multiply_integers(out.sizes().slice(1));
    const at::Tensor eye = at::eye(size, out.options());
    const bool bernoulli = likelihood == "bernoulli";
    const at::Tensor probs = bernoulli ? at::sigmoid(out) : out;
    const at::Tensor scale = bernoulli ? (probs * (1 - probs)).sqrt() : at::ones_like(out);
    for (int64_t k = 0; k < size; ++k) {
      passes.targets.push_back(probs - scale * eye[k].reshape(out.sizes().slice(1)));
    }
    return passes;
  }
  TORCH_CHECK_VALUE(mc_samples >= 1, "Invalid mc_samples: ", mc_samples,
                    " (expected an int >= 1)");
  for (int64_t s = 0; s < mc_samples; ++s) {
    passes.targets.push_back(sample(likelihood, out, generator));
  }
  if (mc_samples > 1) {
    passes.weights = at::full({mc_samples, n}, 1.0 / std::sqrt(static_cast<double>(mc_samples)),
                              out.options());
  }
  return passes;
}

namespace {

void check_batch_op(const at::Tensor& inputs, const std::optional<at::Tensor>& targets,
                    const std::string& what) {
  check_batch(inputs, targets, what);
}

void check_targets_op(const std::string& likelihood, const at::Tensor& output,
                      const at::Tensor& target, const std::string& what) {
  check_targets(likelihood, output, target, what);
}

at::Tensor sample_op(const std::string& likelihood, const at::Tensor& output,
                     std::optional<at::Generator> generator) {
  return sample(likelihood, output, std::move(generator));
}

std::tuple<std::vector<at::Tensor>, std::optional<at::Tensor>> pseudo_targets_op(
    const std::string& likelihood, const at::Tensor& output, const std::string& fisher_type,
    const std::optional<at::Tensor>& targets, int64_t mc_samples,
    std::optional<at::Generator> generator) {
  Passes p = pseudo_targets(likelihood, output, fisher_type, targets, mc_samples,
                            std::move(generator));
  std::optional<at::Tensor> weights;
  if (p.weights.defined()) weights = p.weights;
  return {std::move(p.targets), weights};
}

}  // namespace

// Compositions of ATen ops: autograd (the NLL), meta tensors and torch.compile come from the
// ops they call, on every device.
TORCH_LIBRARY_IMPL(natgrad, CompositeImplicitAutograd, m) {
  m.impl("likelihood_check_batch", &check_batch_op);
  m.impl("likelihood_check_targets", &check_targets_op);
  m.impl("likelihood_nll", &per_sample_nll);
  m.impl("likelihood_sample", &sample_op);
  m.impl("likelihood_pseudo_targets", &pseudo_targets_op);
}

}  // namespace natgrad::likelihood
