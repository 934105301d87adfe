// EWC's shared rules (see ewc_rules.h) and their torch.ops.natgrad.ewc_* ops.
#include "ewc/ewc_rules.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

namespace natgrad::ewc {

void check_options(double lambda, double gamma, const std::string& mode,
                   const std::string& lambda_name) {
  TORCH_CHECK_VALUE(std::isfinite(lambda) && lambda >= 0, "Invalid ", lambda_name, ": ", lambda,
                    " (expected a finite number >= 0)");
  TORCH_CHECK_VALUE(gamma >= 0.0 && gamma <= 1.0, "Invalid gamma: ", gamma,
                    " (expected a number in [0, 1])");
  TORCH_CHECK_VALUE(mode == "separate" || mode == "online", "Invalid mode: '", mode,
                    "' (expected one of 'separate', 'online')");
}

at::Tensor running_mean(const at::Tensor& old, const at::Tensor& fresh, int64_t n, int64_t seen) {
  if (!old.defined()) return fresh;
  TORCH_CHECK_VALUE(n >= 0 && seen >= 0 && n + seen > 0,
                    "running_mean needs sample counts >= 0 with a positive sum, got n = ", n,
                    " and seen = ", seen);
  const double w = static_cast<double>(seen) / static_cast<double>(seen + n);
  return w * old + (1 - w) * fresh;
}

at::Tensor online_merge(double gamma, const at::Tensor& old, const at::Tensor& fresh) {
  return gamma * old + fresh;
}

namespace {

at::Tensor running_mean_op(const std::optional<at::Tensor>& old, const at::Tensor& fresh,
                           int64_t n, int64_t seen) {
  return running_mean(old.has_value() ? *old : at::Tensor(), fresh, n, seen);
}

void check_options_op(double lambda, double gamma, const std::string& mode,
                      const std::string& lambda_name) {
  check_options(lambda, gamma, mode, lambda_name);
}

}  // namespace

// Compositions of ATen ops: every device, autograd and meta tensors come from the ops they call.
TORCH_LIBRARY_IMPL(natgrad, CompositeImplicitAutograd, m) {
  m.impl("ewc_running_mean", &running_mean_op);
  m.impl("ewc_online_merge", &online_merge);
}

// A rule on host numbers: one registration serves every device.
TORCH_LIBRARY_IMPL(natgrad, CompositeExplicitAutograd, m) {
  m.impl("ewc_check_options", &check_options_op);
}

}  // namespace natgrad::ewc
