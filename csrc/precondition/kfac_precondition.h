// K-FAC preconditioning of a layer gradient with the Kronecker-factored Fisher A (x) G.
//
// The gradient is [..., d_out, d_in] with the bias folded in as the last column (d_in counts
// it); leading dims batch several layers of equal shapes. Two forms:
//
// * eigenbasis: with G = V_G diag(l_G) V_G^T and A = V_A diag(l_A) V_A^T (from damped_eigh),
//     P = V_G [(V_G^T dW V_A) / (l_G l_A^T + damping)] V_A^T,
//   the exact inverse of (A (x) G + damping I) applied to dW. With pi_correction the damping
//   is factored instead, as in Martens & Grosse (2015, sec. 6.3, A + pi sqrt(damping) I and
//   G + sqrt(damping) / pi I: each factor is damped in proportion to its own scale):
//     P = V_G [(V_G^T dW V_A) / ((l_G + sqrt(damping) / pi) (l_A + pi sqrt(damping))^T)] V_A^T,
//     pi = sqrt((tr(A) / d_in) / (tr(G) / d_out))   (pi = 1 when either trace is 0).
// * inverse: P = (G + sqrt(damping) / pi I)^-1 dW (A + pi sqrt(damping) I)^-1, where the two
//   damped inverses come from kfac_damped_inverses (Cholesky through the fallback ladder, done
//   once per inverse update) and kfac_precondition_inverse applies them (two matmuls per step).
//
// Non-finite inputs are rejected with an error naming the argument: by kfac_damped_inverses
// before factorising, by the two preconditioning ops from one reduction over their result (a
// NaN/Inf in any input reaches it), so each costs one host read.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace natgrad {

// Martens & Grosse's pi = sqrt(mean(l_A) / mean(l_G)) per batch element (means of the factors'
// eigenvalues, i.e. tr/d), 1 where either mean is not positive. Shared by every op that damps
// the factors separately (kfac_precondition_eigen, kfac_damped_inverses, kfac_directions_*).
at::Tensor pi_from_traces(const at::Tensor& a_trace_mean, const at::Tensor& g_trace_mean);

at::Tensor kfac_precondition_eigen(const at::Tensor& grad, const at::Tensor& g_eigenvalues,
                                   const at::Tensor& g_eigenvectors,
                                   const at::Tensor& a_eigenvalues,
                                   const at::Tensor& a_eigenvectors, double damping,
                                   bool pi_correction);

// Returns (g_inverse, a_inverse, rung): (G + sqrt(damping)/pi I)^-1 and
// (A + pi sqrt(damping) I)^-1 in the factors' dtype, rung = worst ladder rung of the two.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kfac_damped_inverses(const at::Tensor& g_factor,
                                                                    const at::Tensor& a_factor,
                                                                    double damping,
                                                                    bool pi_correction);

at::Tensor kfac_precondition_inverse(const at::Tensor& grad, const at::Tensor& g_inverse,
                                     const at::Tensor& a_inverse);

// K-FAC preconditioning when A is diagonal (an embedding: A = diag(token frequencies), G in its
// eigenbasis G = V_G diag(l_G) V_G^T). grad is [..., d_g, d_a] (the embedding weight's
// transpose), a_diagonal [..., d_a] (clamped at 0), g_eigenvalues [..., d_g]:
//   P = V_G [(V_G^T dW) / (l_G a^T + damping)],
// or with pi_correction
//   P = V_G [(V_G^T dW) / ((l_G + sqrt(damping) / pi) (a + pi sqrt(damping))^T)],
//   pi = sqrt(max(mean(a), 1e-30) / max(mean(l_G), 1e-30)).
// Zero denominators are left unscaled, as in kfac_precondition_eigen. No host read: non-finite
// inputs (an Inf in a or l_G included, which a division would otherwise turn into 0) give a
// NaN result, for the caller's one finiteness read over every direction of the step.
at::Tensor kfac_precondition_diagonal_a(const at::Tensor& grad, const at::Tensor& a_diagonal,
                                        const at::Tensor& g_eigenvalues,
                                        const at::Tensor& g_eigenvectors, double damping,
                                        bool pi_correction);

// EKFAC preconditioning (George et al., 2018) with an arbitrary eigenvalue matrix: the diagonal
// S [..., d_g, d_a] of the Fisher in the Kronecker eigenbasis (factors/ekfac_diagonal.h),
//   P = V_G [(V_G^T dW V_A) / (S + damping)] V_A^T,
// damping exact (no pi correction). An undefined a_eigenvectors means V_A = I (a diagonal A:
// an embedding's transposed layout). S is clamped at 0; zero denominators are left unscaled, as
// in kfac_precondition_eigen. Non-finite inputs are rejected like kfac_precondition_eigen's
// (one reduction over the result and the denominator, one host read).
at::Tensor kfac_precondition_ekfac(const at::Tensor& grad, const at::Tensor& g_eigenvectors,
                                   const std::optional<at::Tensor>& a_eigenvectors,
                                   const at::Tensor& eigenvalues, double damping);

}  // namespace natgrad
