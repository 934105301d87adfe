// EKFAC (George et al., 2018): the second moment of per-sample gradients in the Kronecker
// eigenbasis, re-estimated every factor update instead of taken as l_G l_A^T.
//
// With G = V_G diag(l_G) V_G^T and A = V_A diag(l_A) V_A^T, and dW_n the per-sample gradient of
// sample n (bias folded in as the last column, as in the factor ops), the corrected diagonal is
//   S = E_n[(V_G^T dW_n V_A)^2]   (elementwise square; [d_out, d_in (+1)])
// and the preconditioned gradient is V_G [(V_G^T dW V_A) / (S + damping)] V_A^T
// (kfac_precondition_ekfac in precondition/kfac_precondition.h).
//
// Conventions (shared with factors/kron_factors.h where they overlap):
// * Samples and positions. dim 0 of `input` counts the N samples; a sample's weight-sharing
//   positions (Linear: the middle dims of [N, ..., d_in]; Conv2d: output pixels; Embedding: the
//   indices of [N, ...]) are summed into its gradient, dW_n = grad_scale * sum_r g_nr a_nr^T,
//   with a_nr the input row (Conv2d: patch) with a 1 appended when `bias`.
// * Passes. grad_output may hold P * N samples along dim 0, pass-major: P gradient passes over
//   the same forward (the multi-draw Fisher); their squares are summed, as the factors sum their
//   outer products. The mean is over the N samples: S_new = sum_{p,n} (...)^2 / N.
// * grad_scale turns captured output gradients into per-sample ones (N for a batch-mean loss,
//   1 for a summed one). Unlike the factor ops' grad_scale it carries no sqrt(positions) factor:
//   the positions are summed exactly here.
// * EMA in place: S <- decay * S + (1 - decay) * S_new; decay == 0 replaces S, even a NaN one.
//   The inputs are converted to S's dtype; the eigenvectors must have it.
// * Faults. When S_new is not finite (NaN/Inf statistics, or an overflow), S is left unchanged
//   (decided on the device: no host read). Returns a 0-d bool tensor on S's device: whether S was
//   updated.
// * Memory. Linear layers without positions take one GEMM of the squared rotated statistics,
//   ((G V_G)^2)^T ((X V_A)^2) / N; with positions (and Conv2d), the per-sample rotated gradients
//   are batched matmuls over chunks of whole samples of at most max(S size, 2^22) entries.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace natgrad {

// input [N, ..., d_in], grad_output [P * N, ..., d_out] with the same middle dims,
// diagonal [d_out, d_in (+1)], g_eigenvectors [d_out, d_out], a_eigenvectors [d_in (+1)]^2.
at::Tensor linear_ekfac_diagonal_ema_(at::Tensor& diagonal, const at::Tensor& input,
                                      const at::Tensor& grad_output,
                                      const at::Tensor& g_eigenvectors,
                                      const at::Tensor& a_eigenvectors, bool bias,
                                      double grad_scale, double decay);

// input [N, C, H, W], grad_output [P * N, C_out, OH, OW], diagonal [C_out, C*kh*kw (+1)].
at::Tensor conv2d_ekfac_diagonal_ema_(at::Tensor& diagonal, const at::Tensor& input,
                                      const at::Tensor& grad_output,
                                      const at::Tensor& g_eigenvectors,
                                      const at::Tensor& a_eigenvectors, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, bool bias, double grad_scale,
                                      double decay);

// nn.Embedding, in the transposed layout of its block ([dim, num_embeddings]): A is diagonal,
// so V_A = I and S = E_n[(V_G^T dW_n)^2] with dW_n = grad_scale * sum_r g_nr e_{idx_nr}^T.
// indices [N, ...] (integer, each in [0, num_embeddings)), grad_output [P * N, ..., dim],
// diagonal [dim, num_embeddings], g_eigenvectors [dim, dim].
at::Tensor embedding_ekfac_diagonal_ema_(at::Tensor& diagonal, const at::Tensor& indices,
                                         const at::Tensor& grad_output,
                                         const at::Tensor& g_eigenvectors, double grad_scale,
                                         double decay);

// The diagonal carried into a refreshed eigenbasis: the diagonal, in the new basis, of the
// matrix the old one stands for, Q_old diag(S) Q_old^T with Q = V_G (x) V_A:
//   S_new = (R_G o R_G) S (R_A o R_A)^T,   R_G = V_G^T V_G_old, R_A = V_A^T V_A_old
// (o: elementwise product). The mixing matrices are doubly stochastic, so S_new is
// non-negative and keeps S's total; equal bases (up to signs and order) give S back, permuted.
// Undefined a-side eigenvectors mean V_A = V_A_old = I (an embedding). Returns S_new in S's dtype.
at::Tensor ekfac_rebase(const at::Tensor& eigenvalues, const at::Tensor& old_g_eigenvectors,
                        const at::Tensor& g_eigenvectors,
                        const std::optional<at::Tensor>& old_a_eigenvectors,
                        const std::optional<at::Tensor>& a_eigenvectors);

// Samples per chunk of the per-sample rotated gradients: the largest count whose
// [passes, chunk, d_g, d_a] block (and [chunk, patch_rows] patches) holds at most
// max(d_g * d_a, 2^22) entries (at least 1).
int64_t ekfac_chunk_samples(int64_t passes, int64_t d_g, int64_t d_a, int64_t per_sample_extra);

}  // namespace natgrad
