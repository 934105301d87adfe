#include "precondition/kfac_precondition.h"

#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/subnormal.h"
#include "linalg/psd_linalg.h"

namespace natgrad {
namespace {

constexpr const char* kNonFiniteAdvice =
    "the preconditioned gradient is undefined; skip this step for the layer (natgrad.KFAC does) "
    "or find where the NaN/Inf comes from";

// Validates grad [..., m, n] against per-side matrices [..., m, m] / [..., n, n] (the batch
// dims of the side tensors must equal grad's).
void check_sides(const at::Tensor& grad, const at::Tensor& g_side, const char* g_name,
                 const at::Tensor& a_side, const char* a_name) {
  checks::floating(grad, "grad");
  checks::dim_ge(grad, 2, "grad", "[..., out_features, in_features (+1 for bias)]");
  checks::same_device_dtype(g_side, grad, g_name, "grad");
  checks::same_device_dtype(a_side, grad, a_name, "grad");
  const auto batch = grad.sizes().slice(0, grad.dim() - 2);
  std::vector<int64_t> g_shape(batch.begin(), batch.end()), a_shape = g_shape;
  g_shape.insert(g_shape.end(), {grad.size(-2), grad.size(-2)});
  a_shape.insert(a_shape.end(), {grad.size(-1), grad.size(-1)});
  checks::shape_eq(g_side, g_shape, g_name, "[..., d_out, d_out] matching grad");
  checks::shape_eq(a_side, a_shape, a_name, "[..., d_in, d_in] matching grad");
}

}  // namespace

at::Tensor pi_from_traces(const at::Tensor& a_trace_mean, const at::Tensor& g_trace_mean) {
  const at::Tensor ok = (a_trace_mean > 0).logical_and(g_trace_mean > 0);
  const at::Tensor pi = (a_trace_mean / g_trace_mean.where(ok, at::ones_like(g_trace_mean))).sqrt();
  return pi.where(ok, at::ones_like(pi));
}

at::Tensor kfac_precondition_eigen(const at::Tensor& grad, const at::Tensor& g_eigenvalues,
                                   const at::Tensor& g_eigenvectors,
                                   const at::Tensor& a_eigenvalues,
                                   const at::Tensor& a_eigenvectors, double damping,
                                   bool pi_correction) {
  check_sides(grad, g_eigenvectors, "g_eigenvectors", a_eigenvectors, "a_eigenvectors");
  checks::same_device_dtype(g_eigenvalues, grad, "g_eigenvalues", "grad");
  checks::same_device_dtype(a_eigenvalues, grad, "a_eigenvalues", "grad");
  checks::shape_eq(g_eigenvalues, g_eigenvectors.sizes().slice(0, grad.dim() - 1), "g_eigenvalues",
                   "[..., d_out] matching g_eigenvectors");
  checks::shape_eq(a_eigenvalues, a_eigenvectors.sizes().slice(0, grad.dim() - 1), "a_eigenvalues",
                   "[..., d_in] matching a_eigenvectors");
  checks::damping(damping, /*strictly_positive=*/false);

  at::Tensor rotated =
      at::matmul(at::matmul(g_eigenvectors.mT(), without_subnormals(grad)), a_eigenvectors);
  at::Tensor denom;
  if (pi_correction) {
    const at::Tensor pi =
        pi_from_traces(a_eigenvalues.mean(-1), g_eigenvalues.mean(-1)).unsqueeze(-1);
    const double root = std::sqrt(damping);
    denom = (g_eigenvalues + root / pi).unsqueeze(-1) * (a_eigenvalues + pi * root).unsqueeze(-2);
  } else {
    denom = (g_eigenvalues.unsqueeze(-1) * a_eigenvalues.unsqueeze(-2)).add_(damping);
  }
  // A zero denominator (no damping, zero eigenvalue) means the direction carries no curvature
  // information: it is left unscaled rather than divided by zero.
  // Eigenvalues reach the result only through the denominator, where an Inf would vanish
  // (x / Inf = 0): its own flag, taken before the masking below, joins the result's.
  const at::Tensor denom_finite = checks::finite_flag(denom);
  denom.masked_fill_(denom <= 0, 1.0);
  rotated.div_(denom);
  at::Tensor out = at::matmul(at::matmul(g_eigenvectors, rotated), a_eigenvectors.mT());
  checks::finite_flags({checks::finite_flag(out), denom_finite}, out.scalar_type(),
                       {{grad, "grad"},
                        {g_eigenvalues, "g_eigenvalues"},
                        {g_eigenvectors, "g_eigenvectors"},
                        {a_eigenvalues, "a_eigenvalues"},
                        {a_eigenvectors, "a_eigenvectors"}},
                       kNonFiniteAdvice);
  flush_subnormal_(out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kfac_damped_inverses(const at::Tensor& g_factor,
                                                                    const at::Tensor& a_factor,
                                                                    double damping,
                                                                    bool pi_correction) {
  checks::floating(g_factor, "g_factor");
  checks::square(g_factor, "g_factor");
  checks::square(a_factor, "a_factor");
  checks::same_device_dtype(a_factor, g_factor, "a_factor", "g_factor");
  TORCH_CHECK(a_factor.sizes().slice(0, a_factor.dim() - 2) ==
                  g_factor.sizes().slice(0, g_factor.dim() - 2),
              "a_factor and g_factor must have the same batch dims, got ", a_factor.sizes(),
              " and ", g_factor.sizes());
  checks::damping(damping, /*strictly_positive=*/true);
  checks::finite({{g_factor, "g_factor"}, {a_factor, "a_factor"}},
                 "skip this update or reset the factors");

  at::Tensor pi = at::ones(g_factor.sizes().slice(0, g_factor.dim() - 2),
                           g_factor.options().dtype(at::kDouble));
  if (pi_correction) {
    pi = pi_from_traces(a_factor.diagonal(0, -2, -1).to(at::kDouble).mean(-1),
                        g_factor.diagonal(0, -2, -1).to(at::kDouble).mean(-1));
  }
  const double root = std::sqrt(damping);
  auto damped_inverse = [](const at::Tensor& factor, const at::Tensor& shift) {
    const at::Tensor eye = at::eye(factor.size(-1), factor.options());
    const at::Tensor shifted =
        factor + eye * shift.to(factor.scalar_type()).unsqueeze(-1).unsqueeze(-1);
    return spd_inverse(shifted);
  };
  SolveResult g = damped_inverse(g_factor, root / pi);
  SolveResult a = damped_inverse(a_factor, pi * root);
  const Rung worst = std::max(g.rung, a.rung);
  at::Tensor g_inverse = g.solution.to(g_factor.scalar_type()).contiguous();
  at::Tensor a_inverse = a.solution.to(a_factor.scalar_type()).contiguous();
  flush_subnormal_(g_inverse);  // float64 -> float32 can land below float32's normal range
  flush_subnormal_(a_inverse);
  return {g_inverse, a_inverse, rung_tensor(worst)};
}

at::Tensor kfac_precondition_inverse(const at::Tensor& grad, const at::Tensor& g_inverse,
                                     const at::Tensor& a_inverse) {
  check_sides(grad, g_inverse, "g_inverse", a_inverse, "a_inverse");
  at::Tensor out = at::matmul(at::matmul(g_inverse, without_subnormals(grad)), a_inverse);
  checks::finite_result(out, {{grad, "grad"}, {g_inverse, "g_inverse"}, {a_inverse, "a_inverse"}},
                        kNonFiniteAdvice);
  flush_subnormal_(out);
  return out;
}

at::Tensor kfac_precondition_diagonal_a(const at::Tensor& grad, const at::Tensor& a_diagonal,
                                        const at::Tensor& g_eigenvalues,
                                        const at::Tensor& g_eigenvectors, double damping,
                                        bool pi_correction) {
  checks::floating(grad, "grad");
  checks::dim_ge(grad, 2, "grad", "[..., d_g, d_a]");
  checks::same_device_dtype(a_diagonal, grad, "a_diagonal", "grad");
  checks::same_device_dtype(g_eigenvalues, grad, "g_eigenvalues", "grad");
  checks::same_device_dtype(g_eigenvectors, grad, "g_eigenvectors", "grad");
  const auto batch = grad.sizes().slice(0, grad.dim() - 2);
  std::vector<int64_t> a_shape(batch.begin(), batch.end()), g_shape = a_shape;
  a_shape.push_back(grad.size(-1));
  g_shape.push_back(grad.size(-2));
  checks::shape_eq(a_diagonal, a_shape, "a_diagonal", "[..., d_a] matching grad");
  checks::shape_eq(g_eigenvalues, g_shape, "g_eigenvalues", "[..., d_g] matching grad");
  g_shape.push_back(grad.size(-2));
  checks::shape_eq(g_eigenvectors, g_shape, "g_eigenvectors", "[..., d_g, d_g] matching grad");
  checks::damping(damping, /*strictly_positive=*/false);

  const at::Tensor a = a_diagonal.clamp_min(0);
  at::Tensor rotated = at::matmul(g_eigenvectors.mT(), without_subnormals(grad));
  at::Tensor denom;
  if (pi_correction) {
    const at::Tensor pi = (a.mean(-1, /*keepdim=*/true).clamp_min(1e-30) /
                           g_eigenvalues.mean(-1, /*keepdim=*/true).clamp_min(1e-30))
                              .sqrt();
    const double root = std::sqrt(damping);
    denom = (g_eigenvalues + root / pi).unsqueeze(-1) * (a + pi * root).unsqueeze(-2);
  } else {
    denom = (g_eigenvalues.unsqueeze(-1) * a.unsqueeze(-2)).add_(damping);
  }
  // An Inf in the denominator would vanish from the result (x / Inf = 0): it poisons the
  // result instead, on the device (NaN where any denominator is not finite).
  const at::Tensor poison =
      at::where(checks::finite_flag(denom), at::zeros({}, denom.options()),
                at::full({}, std::numeric_limits<double>::quiet_NaN(), denom.options()));
  denom.masked_fill_(denom <= 0, 1.0);
  rotated.div_(denom);
  at::Tensor out = at::matmul(g_eigenvectors, rotated).add_(poison);
  flush_subnormal_(out);
  return out;
}

at::Tensor kfac_precondition_ekfac(const at::Tensor& grad, const at::Tensor& g_eigenvectors,
                                   const std::optional<at::Tensor>& a_eigenvectors,
                                   const at::Tensor& eigenvalues, double damping) {
  checks::floating(grad, "grad");
  checks::dim_ge(grad, 2, "grad", "[..., d_g, d_a]");
  checks::same_device_dtype(g_eigenvectors, grad, "g_eigenvectors", "grad");
  checks::same_device_dtype(eigenvalues, grad, "eigenvalues", "grad");
  const auto batch = grad.sizes().slice(0, grad.dim() - 2);
  std::vector<int64_t> g_shape(batch.begin(), batch.end()), a_shape = g_shape;
  g_shape.insert(g_shape.end(), {grad.size(-2), grad.size(-2)});
  a_shape.insert(a_shape.end(), {grad.size(-1), grad.size(-1)});
  checks::shape_eq(g_eigenvectors, g_shape, "g_eigenvectors", "[..., d_g, d_g] matching grad");
  checks::shape_eq(eigenvalues, grad.sizes(), "eigenvalues", "[..., d_g, d_a] matching grad");
  const bool has_a = a_eigenvectors.has_value() && a_eigenvectors->defined();
  if (has_a) {
    checks::same_device_dtype(*a_eigenvectors, grad, "a_eigenvectors", "grad");
    checks::shape_eq(*a_eigenvectors, a_shape, "a_eigenvectors", "[..., d_a, d_a] matching grad");
  }
  checks::damping(damping, /*strictly_positive=*/false);

  at::Tensor rotated = at::matmul(g_eigenvectors.mT(), without_subnormals(grad));
  if (has_a) rotated = at::matmul(rotated, *a_eigenvectors);
  at::Tensor denom = eigenvalues.clamp_min(0).add_(damping);
  // An Inf would vanish from the result (x / Inf = 0): its own flag joins the result's.
  const at::Tensor denom_finite = checks::finite_flag(denom);
  denom.masked_fill_(denom <= 0, 1.0);
  rotated.div_(denom);
  at::Tensor out = at::matmul(g_eigenvectors, rotated);
  if (has_a) out = at::matmul(out, a_eigenvectors->mT());
  const at::Tensor a_or_grad = has_a ? *a_eigenvectors : grad;
  checks::finite_flags({checks::finite_flag(out), denom_finite}, out.scalar_type(),
                       {{grad, "grad"},
                        {g_eigenvectors, "g_eigenvectors"},
                        {a_or_grad, has_a ? "a_eigenvectors" : "grad"},
                        {eigenvalues, "eigenvalues"}},
                       kNonFiniteAdvice);
  flush_subnormal_(out);
  return out;
}

// ATen compositions (matmul, linalg): registered for every device; Meta is served by the Python
// fake kernels (python/natgrad/ops/linalg.py).
TORCH_LIBRARY_IMPL(natgrad, CompositeExplicitAutograd, m) {
  m.impl("kfac_precondition_eigen", &kfac_precondition_eigen);
  m.impl("kfac_damped_inverses", &kfac_damped_inverses);
  m.impl("kfac_precondition_inverse", &kfac_precondition_inverse);
  m.impl("kfac_precondition_diagonal_a", &kfac_precondition_diagonal_a);
  m.impl("kfac_precondition_ekfac", &kfac_precondition_ekfac);
}

}  // namespace natgrad
