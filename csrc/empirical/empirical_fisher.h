// Empirical-Fisher operations built from per-sample gradients.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace natgrad {

// Empirical-Fisher natural gradient by the Woodbury identity.
//
// With U = per_sample_grads [n, p] (one flattened per-sample gradient per row) and
// F = U^T U / n, returns ((F + damping I)^-1 rhs, rung) for rhs [p] or [p, k]:
//   (F + damping I)^-1 v = (v - U^T (U U^T + n damping I)^-1 U v) / damping.
// Cost O(n^2 p + n^3) time and O(n p + n^2) memory when n <= p (the p x p matrix is never
// formed); when p < n the p x p system (U^T U + n damping I) x = n v is cheaper (O(n p^2 + p^3))
// and is solved instead. U and rhs are scaled by exact powers of two so that the products
// cannot overflow; the small system is solved in float64 by Cholesky through the fallback
// ladder (rung reported), and the solution is returned in the inputs' dtype. Non-finite inputs
// are rejected.
std::tuple<at::Tensor, at::Tensor> woodbury_solve(const at::Tensor& per_sample_grads,
                                                  const at::Tensor& rhs, double damping);

// Per-sample diagonal empirical Fisher of an nn.Linear layer from its hook data.
//
// input [N, ..., d_in] and grad_output [N, ..., d_out] share their leading dims; dim 0 indexes
// samples and any dims between are weight-sharing positions (tokens), summed inside each
// sample's gradient. Returns [d_out, d_in (+1 with bias, as the last column)]:
//   grad_scale^2 / N * sum_n (per-sample weight gradient of sample n)^2,
// which for 2-D inputs is grad_scale^2 / N * (g^2)^T (a^2) - no loop over samples. With
// positions, per-sample gradients are formed in chunks of samples (bounded memory).
// grad_scale follows the convention of kron_factors.h (N for a batch-mean loss, 1 for a sum).
// NaN/Inf inputs are rejected (one reduction over the result; the error names the argument).
at::Tensor linear_diag_fisher(const at::Tensor& input, const at::Tensor& grad_output, bool bias,
                              double grad_scale);

}  // namespace natgrad
