#include "empirical/empirical_fisher.h"

#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/checks.h"
#include "linalg/psd_linalg.h"

namespace natgrad {
namespace {

// 2^-e with 2^(e-1) <= max|t| < 2^e, so that t * scale lies in [-1, 1] exactly (a power of two
// changes no mantissa); 1 for an all-zero (or empty) tensor. One host read.
double power_of_two_scale(const at::Tensor& t) {
  if (t.numel() == 0) return 1.0;
  const auto [low, high] = at::aminmax(t);
  const double peak = std::max(std::abs(low.item<double>()), std::abs(high.item<double>()));
  if (!(peak > 0.0) || !std::isfinite(peak)) return 1.0;
  int e = 0;
  std::frexp(peak, &e);
  return std::ldexp(1.0, -e);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> woodbury_solve(const at::Tensor& per_sample_grads,
                                                  const at::Tensor& rhs, double damping) {
  const at::Tensor& U = per_sample_grads;
  checks::floating(U, "per_sample_grads");
  checks::dim_eq(U, 2, "per_sample_grads", "[n_samples, n_params]");
  checks::nonempty_rows(U.size(0), "per_sample_grads");
  checks::same_device_dtype(rhs, U, "rhs", "per_sample_grads");
  TORCH_CHECK((rhs.dim() == 1 || rhs.dim() == 2) && rhs.size(0) == U.size(1),
              "rhs must have shape [n_params] or [n_params, k] with n_params = ", U.size(1),
              " (per_sample_grads.size(1)), got ", rhs.sizes());
  checks::damping(damping, /*strictly_positive=*/true);
  checks::finite({{U, "per_sample_grads"}, {rhs, "rhs"}},
                 "the natural gradient is undefined; skip this step or find the non-finite "
                 "per-sample gradient");

  // U U^T of float32 rows ~1e20 overflows float32 (and the n x n solution of rows ~1e30
  // underflows it), which would push the ladder to its diagonal rung and a wrong answer. Exact
  // power-of-two scales s (of U) and r (of rhs) keep every product in range in the inputs' own
  // dtype, with no float64 copy of U: with U' = sU, v' = rv,
  //   y' = (U'U'^T + n lambda s^2 I)^-1 U'v'   (in float64: the n x n system)
  //   x  = (v' - U'^T y') / (r lambda),
  // which is (v - U^T (UU^T + n lambda I)^-1 U v) / lambda. For inputs of ordinary size s = r = 1
  // up to a power of two, so the result is the unscaled computation's, bit for bit.
  const int64_t n = U.size(0);
  const at::Tensor R = rhs.dim() == 1 ? rhs.unsqueeze(1) : rhs;
  const double s = power_of_two_scale(U), r = power_of_two_scale(R);
  const at::Tensor Us = s == 1.0 ? U : U * s;
  const at::Tensor Rs = r == 1.0 ? R : R * r;
  const int64_t p = U.size(1);
  if (p < n) {
    // The p x p system costs n p^2 + p^3 against n^2 p + n^3: cheaper when p < n. With the
    // same scales, (U'^T U' + n lambda s^2 I) x' = n s^2 v' and x = x' / r, in float64.
    const at::Tensor Ud = Us.to(at::kDouble);
    at::Tensor system = at::matmul(Ud.t(), Ud);
    system.diagonal().add_(static_cast<double>(n) * damping * s * s);
    const SolveResult big =
        spd_solve(system, Rs.to(at::kDouble).mul_(static_cast<double>(n) * s * s));
    at::Tensor x = big.solution.to(at::kDouble).div_(r).to(U.scalar_type());
    return {(rhs.dim() == 1 ? x.squeeze(1) : x).contiguous(), rung_tensor(big.rung)};
  }
  const at::Tensor projected = at::matmul(Us, Rs).to(at::kDouble);  // U'v'     [n, k]
  at::Tensor gram = at::matmul(Us, Us.t()).to(at::kDouble);         // U'U'^T   [n, n]
  gram.diagonal().add_(static_cast<double>(n) * damping * s * s);
  const SolveResult small = spd_solve(gram, projected);
  at::Tensor x = (Rs - at::matmul(Us.t(), small.solution.to(U.scalar_type())))
                     .to(at::kDouble)
                     .div_(r * damping)
                     .to(U.scalar_type());
  return {(rhs.dim() == 1 ? x.squeeze(1) : x).contiguous(), rung_tensor(small.rung)};
}

at::Tensor linear_diag_fisher(const at::Tensor& input, const at::Tensor& grad_output, bool bias,
                              double grad_scale) {
  checks::floating(input, "input");
  checks::dim_ge(input, 2, "input", "[N, ..., in_features] (dim 0 indexes samples)");
  checks::same_device_dtype(grad_output, input, "grad_output", "input");
  TORCH_CHECK(grad_output.dim() == input.dim() && grad_output.sizes().slice(0, input.dim() - 1) ==
                                                      input.sizes().slice(0, input.dim() - 1),
              "grad_output must have the leading dims of input ",
              input.sizes().slice(0, input.dim() - 1), " followed by out_features, got ",
              grad_output.sizes());
  checks::nonempty_rows(input.size(0), "input");
  checks::grad_scale(grad_scale);

  const int64_t samples = input.size(0), d_in = input.size(-1), d_out = grad_output.size(-1);
  at::Tensor weight, bias_part;
  if (input.dim() == 2) {
    weight = at::matmul(grad_output.square().t(), input.square());
    if (bias) bias_part = grad_output.square().sum(0);
  } else {
    // Explicit position count: reshape({N, -1, 0}) is ambiguous for 0 features.
    const int64_t positions = c10::multiply_integers(input.sizes().slice(1, input.dim() - 2));
    const at::Tensor a = input.reshape({samples, positions, d_in});
    const at::Tensor g = grad_output.reshape({samples, positions, d_out});
    weight = at::zeros({d_out, d_in}, input.options());
    const int64_t budget = std::max<int64_t>(d_out * d_in, int64_t{1} << 22);
    const int64_t chunk = std::max<int64_t>(1, budget / std::max<int64_t>(1, d_out * d_in));
    for (int64_t first = 0; first < samples; first += chunk) {
      const int64_t count = std::min(chunk, samples - first);
      const at::Tensor per_sample =
          at::bmm(g.narrow(0, first, count).transpose(1, 2), a.narrow(0, first, count));
      weight.add_(per_sample.square_().sum(0));
    }
    if (bias) bias_part = g.sum(1).square_().sum(0);
  }
  at::Tensor out = bias ? at::cat({weight, bias_part.unsqueeze(1)}, 1) : weight;
  out.mul_(grad_scale * grad_scale / static_cast<double>(samples));
  checks::finite_result(out, {{input, "input"}, {grad_output, "grad_output"}},
                        "the diagonal Fisher is undefined; skip this batch or find where the "
                        "NaN/Inf comes from");
  return out;
}

// ATen compositions (matmul, bmm, Cholesky through the ladder): registered for every device;
// Meta is served by the Python fake kernels (python/natgrad/ops/empirical.py).
TORCH_LIBRARY_IMPL(natgrad, CompositeExplicitAutograd, m) {
  m.impl("woodbury_solve", &woodbury_solve);
  m.impl("linear_diag_fisher", &linear_diag_fisher);
}

}  // namespace natgrad
