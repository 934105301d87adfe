#include "linalg/psd_linalg.h"

#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/subnormal.h"

namespace natgrad {

at::Tensor rung_tensor(Rung rung) {
  // Deliberately on the CPU whatever the inputs' device: the rung is a host-side decision, and a
  // device tensor would cost a copy now and a sync whenever it is read.
  return at::scalar_tensor(static_cast<int64_t>(rung), at::dtype(at::kLong).device(at::kCPU));
}

EighResult damped_eigh(const at::Tensor& factor, double damping) {
  checks::floating(factor, "factor");
  checks::square(factor, "factor");
  checks::damping(damping, /*strictly_positive=*/false);
  TORCH_CHECK(factor.size(-1) > 0, "factor must not be empty, got shape ", factor.sizes());
  TORCH_CHECK(all_finite({factor}),
              "factor contains NaN or Inf: no eigendecomposition exists; skip this update "
              "(natgrad.KFAC does so per layer) or reset the factor");

  const at::Tensor sym = symmetrized(factor);
  at::Tensor evals, evecs;
  const Rung rung = climb_ladder(sym, [&](const at::Tensor& m) {
    auto [w, v] = at::linalg_eigh(m);
    if (!all_finite({w, v})) return false;
    evals = w;
    evecs = v;
    return true;
  });
  if (rung == Rung::kDiagonal) {
    evals = sym.diagonal(0, -2, -1).clone();
    evecs = at::diag_embed(at::ones_like(evals));
  }
  evals = evals.clamp_min(0.0).add_(damping).to(factor.scalar_type());
  evecs = evecs.to(factor.scalar_type()).contiguous();  // LAPACK returns column-major
  flush_subnormal_(evals);
  flush_subnormal_(evecs);
  return {evals, evecs, rung};
}

namespace {

// Through the ladder: Cholesky of each rung's matrix, then `finish(chol, m)`; rung kDiagonal solves
// `rhs` (built on demand) with diag(S), a Jacobi approximation.
template <class Finish, class Rhs>
SolveResult cholesky_ladder(const at::Tensor& spd, Finish finish, Rhs rhs) {
  const at::Tensor sym = symmetrized(spd);
  at::Tensor solution;
  const Rung rung = climb_ladder(sym, [&](const at::Tensor& m) {
    auto [chol, info] = at::linalg_cholesky_ex(m);
    if (info.ne(0).any().item<bool>()) return false;
    at::Tensor x = finish(chol, m);
    if (!all_finite({x})) return false;
    solution = x;
    return true;
  });
  if (rung == Rung::kDiagonal) {
    const at::Tensor diag = sym.to(at::kDouble).diagonal(0, -2, -1);
    const double floor = std::max(diag.abs().max().item<double>() * 1e-12, 1e-300);
    solution = rhs().to(at::kDouble) / diag.clamp_min(floor).unsqueeze(-1);
  }
  flush_subnormal_(solution);
  return {solution, rung};
}

}  // namespace

SolveResult spd_solve(const at::Tensor& spd, const at::Tensor& rhs) {
  return cholesky_ladder(
      spd,
      [&](const at::Tensor& chol, const at::Tensor& m) {
        return at::cholesky_solve(rhs.to(m.scalar_type()), chol);
      },
      [&] { return rhs; });
}

SolveResult spd_inverse(const at::Tensor& spd) {
  return cholesky_ladder(
      spd, [](const at::Tensor& chol, const at::Tensor&) { return at::cholesky_inverse(chol); },
      [&] { return at::eye(spd.size(-1), spd.options()).expand_as(spd); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_eigh_op(const at::Tensor& factor,
                                                              double damping) {
  EighResult r = damped_eigh(factor, damping);
  return {r.eigenvalues, r.eigenvectors, rung_tensor(r.rung)};
}

// ATen compositions (linalg_eigh / linalg_cholesky_ex: LAPACK on CPU, cuSOLVER/MAGMA on CUDA):
// registered for every device. Meta is served by the Python fake kernel.
TORCH_LIBRARY_IMPL(natgrad, CompositeExplicitAutograd, m) {
  m.impl("damped_eigh", &damped_eigh_op);
}

}  // namespace natgrad
