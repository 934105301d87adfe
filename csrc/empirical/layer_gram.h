// Per-sample gradient rows of a layer, implicitly: their Gram matrix U U^T and the products
// U v and U^T w, from the layer's inputs and output gradients (the hook data), never forming U.
//
// Rows. A layer sees inputs of N samples; grad_output holds R = P * N rows (P passes: one per
// sampled label or class of a Fisher estimate, pass-major), row r belonging to sample r % N.
// Row r of U is the per-sample gradient of the layer's parameters that row r's output gradient
// induces: for nn.Linear with input [N, ..., d_in] (dims between the first and the last are
// weight-sharing positions t) it is sum_t g_rt a_(r%N)t^T (+ sum_t g_rt for the bias), so
//   (U U^T)_rs = sum_{t,u} (a_rt . a_su + [bias]) (g_rt . g_su)
// which, with one position, is (X X^T) o (G G^T) (+ G G^T). The products are
//   (U v)_r   = sum_t g_rt . (V a_(r%N)t + b_v)          (one GEMM)
//   (U^T w)   = sum_r w_r sum_t g_rt a_(r%N)t^T, sum_r w_r sum_t g_rt   (one GEMM)
// Conv2d uses the same rows with a_t the input patch at output position t (U v is a
// convolution with V, U^T w its weight gradient: neither unfolds the input); nn.Embedding uses
// one-hot a_t, so a . a' is an index comparison and V a is a row lookup.
//
// Cost of the Gram: with one position (X X^T) o (G G^T) costs R^2 (d_in + d_out); with T
// positions the pairwise form costs R^2 T^2 (d_in + d_out) and per-sample gradients
// R T d_in d_out + R^2 d_in d_out: linear_gram picks the cheaper (the per-sample form then holds
// that one layer's R x d_out d_in gradients); conv2d_gram always forms per-sample gradients
// (T is the number of output pixels), unfolding a chunk of samples at a time.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace natgrad {

// (U U^T) [R, R] of an nn.Linear layer: input [N, ..., d_in], grad_output [R, ..., d_out].
at::Tensor linear_gram(const at::Tensor& input, const at::Tensor& grad_output, bool bias);

// U v [R] for v = (weight [d_out, d_in], optional bias [d_out]).
at::Tensor linear_rows_mv(const at::Tensor& input, const at::Tensor& grad_output,
                          const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// U^T w for w [R]: (weight part [d_out, d_in], bias part [d_out]).
std::tuple<at::Tensor, at::Tensor> linear_rows_tmv(const at::Tensor& input,
                                                   const at::Tensor& grad_output,
                                                   const at::Tensor& weights);

// Conv2d (groups = 1, zero padding): input [N, C_in, H, W], grad_output [R, C_out, H', W'].
at::Tensor conv2d_gram(const at::Tensor& input, const at::Tensor& grad_output,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, bool bias);

// U v [R] for v = (weight [C_out, C_in, kh, kw], optional bias [C_out]).
at::Tensor conv2d_rows_mv(const at::Tensor& input, const at::Tensor& grad_output,
                          const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation);

// U^T w: (weight part [C_out, C_in, kh, kw], bias part [C_out]).
std::tuple<at::Tensor, at::Tensor> conv2d_rows_tmv(const at::Tensor& input,
                                                   const at::Tensor& grad_output,
                                                   const at::Tensor& weights,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation);

// nn.Embedding: indices [N, ...] (int64), grad_output [R, ..., dim].
at::Tensor embedding_gram(const at::Tensor& indices, const at::Tensor& grad_output);

// U v [R] for v = weight [num_embeddings, dim].
at::Tensor embedding_rows_mv(const at::Tensor& indices, const at::Tensor& grad_output,
                             const at::Tensor& weight);

// U^T w [num_embeddings, dim].
at::Tensor embedding_rows_tmv(const at::Tensor& indices, const at::Tensor& grad_output,
                              const at::Tensor& weights, int64_t num_embeddings);

// (gram + shift I)^-1 rhs for a symmetric PSD gram [R, R] and rhs [R] or [R, k], shift > 0:
// the small system of the Woodbury identity. Solved in float64 by Cholesky through the
// fallback ladder (rung returned as a 0-dim int64 CPU tensor), returned in rhs's dtype.
std::tuple<at::Tensor, at::Tensor> gram_solve(const at::Tensor& gram, const at::Tensor& rhs,
                                              double shift);

}  // namespace natgrad
