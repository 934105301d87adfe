// Factorisations of symmetric positive (semi-)definite matrices that never return NaN or Inf.
//
// Every function here goes through the fallback ladder of ladder.h and reports the rung used.
// They are device-generic ATen compositions (LAPACK on CPU, cuSOLVER on CUDA) and accept a
// single matrix or a batch [..., n, n]; a batch climbs the ladder together.
// Every rung reads its success back to the host (one sync per attempt on an accelerator).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "linalg/ladder.h"

namespace natgrad {

struct EighResult {
  at::Tensor eigenvalues;   // [..., n], clamped at 0, plus damping; ascending except on the
                            // diagonal rung (diagonal order, paired with identity columns)
  at::Tensor eigenvectors;  // [..., n, n], columns are eigenvectors
  Rung rung;
};

// Eigendecomposition of the symmetrised PSD `factor`, eigenvalues clamped at 0 and shifted by
// `damping` >= 0. Rung kDiagonal returns diag(factor) and the identity. Outputs have the
// factor's dtype. Raises when the factor holds NaN/Inf (nothing sensible can be returned).
EighResult damped_eigh(const at::Tensor& factor, double damping);

struct SolveResult {
  at::Tensor solution;  // dtype of the promoted system (float64 unless rung kNative)
  Rung rung;
};

// Solves S X = B for a symmetric positive-definite S [..., n, n] and B [..., n, k] by Cholesky
// through the ladder; rung kDiagonal solves with diag(S) (a Jacobi approximation).
SolveResult spd_solve(const at::Tensor& spd, const at::Tensor& rhs);

// S^-1 of a symmetric positive-definite S [..., n, n]: spd_solve(S, I), but through
// cholesky_inverse (LAPACK potri: one triangular inverse and a symmetric product, about half the
// work of solving against the identity, and exactly symmetric).
SolveResult spd_inverse(const at::Tensor& spd);

// Op entry point: (eigenvalues, eigenvectors, rung as a 0-dim int64 tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_eigh_op(const at::Tensor& factor,
                                                              double damping);

// The rung as a 0-dim int64 CPU tensor, whatever the device of the op's inputs (how ops report
// it, so that torch.compile never has to trace a data-dependent Python int).
at::Tensor rung_tensor(Rung rung);

}  // namespace natgrad
