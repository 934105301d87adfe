// Kronecker-factor statistics for K-FAC: A = E[a a^T] (activation side) and G = E[g g^T]
// (gradient side) of nn.Linear and nn.Conv2d layers.
//
// Conventions (documented once, used by every function below):
// * Rows. Leading dimensions are flattened: a Linear input [..., d_in] has n = prod(...) rows;
//   a Conv2d input [N, C, H, W] has n = N * OH * OW patch rows of length C * kh * kw, ordered
//   (c, i, j) like weight.view(C_out, -1). Conv2d output gradients [N, C_out, OH, OW] have the
//   same N * OH * OW rows.
// * Bias. With `bias`, a column of ones is appended to each activation row, so the factor is
//   (d + 1) x (d + 1) and matches a gradient with the bias folded in as the last column. The
//   ones are never materialised.
// * Normalisation. Every factor is a mean over its rows: A = a^T a / n and
//   G = grad_scale^2 * g^T g / n.
// * grad_scale. Autograd's output gradients carry the loss's reduction: with a loss averaged
//   over N samples each g is (1/N) times the per-sample gradient. grad_scale multiplies the
//   gradients back: pass N for a batch-mean loss, 1 for a summed loss. For Conv2d K-FAC in the
//   KFC form (Grosse & Martens 2016), whose G sums over spatial positions, pass N * sqrt(OH*OW).
// * EMA forms update `factor` in place, factor <- decay * factor + (1 - decay) * new, in one
//   pass: the Gram product is accumulated straight into the factor's storage (BLAS beta), so no
//   second factor-sized tensor is allocated. Inputs of another floating dtype are converted to
//   the factor's dtype (e.g. bfloat16 activations under autocast into a float32 factor).
// * Conv2d patches are unfolded in chunks of whole samples whose patch block holds at most
//   max(factor size, kConvChunkElements) entries, so memory stays bounded by the larger of the
//   factor and 2^18 entries (the full unfolded patch matrix, n x C*kh*kw, exists only when it is
//   that small), while small layers take one or a few chunks (a chunk per sample cost more in
//   per-call overhead than its GEMM on small convolutions).
#pragma once

#include <ATen/ATen.h>

namespace natgrad {

at::Tensor linear_act_factor(const at::Tensor& input, bool bias);
void linear_act_factor_ema_(at::Tensor& factor, const at::Tensor& input, bool bias, double decay);

at::Tensor conv2d_act_factor(const at::Tensor& input, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, bool bias);
void conv2d_act_factor_ema_(at::Tensor& factor, const at::Tensor& input,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, bool bias,
                            double decay);

at::Tensor linear_grad_factor(const at::Tensor& grad_output, double grad_scale);
void linear_grad_factor_ema_(at::Tensor& factor, const at::Tensor& grad_output, double grad_scale,
                             double decay);

at::Tensor conv2d_grad_factor(const at::Tensor& grad_output, double grad_scale);
void conv2d_grad_factor_ema_(at::Tensor& factor, const at::Tensor& grad_output, double grad_scale,
                             double decay);

// Every Linear/Conv2d layer's A and G EMA updates of one K-FAC factor step in one call
// (natgrad.KFAC; one read of the statistics' bounds inside, none by the caller until it wants the
// flags). Per layer i: a_factors[i] <- decays[i] * A + (1 - decays[i]) * new A from inputs[i]
// (linear_act_factor_ema_ or conv2d_act_factor_ema_), and g_factors[i] likewise from
// grad_outputs[i] with grad_scales[i]. `layouts` holds 9 integers per layer:
//   [bias (0/1), kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w, dilation_h,
//    dilation_w]   (kernel 0 0 and zeros after it: a Linear layer; else a Conv2d layer).
// Every argument of every layer is validated before any factor changes.
// Faults. A layer whose inputs or output gradients hold NaN/Inf, or values so large that a Gram
// sum of the update could overflow the factor dtype (max|x|^2 * rows >= finfo.max / 4, and for
// the gradients max|g|^2 * rows * max(grad_scale^2, 1) >= finfo.max / 4), is left untouched.
// Should an updated factor still be non-finite (the bound makes it unreachable: a Gram EMA's
// largest entries lie on its diagonal, |F_ij| <= sqrt(F_ii F_jj), so the diagonal is checked), both
// of the layer's factors are zeroed, so that nothing non-finite is ever kept.
// Returns flags [L, 2] float64 on the factors' device: (1 if the layer was updated else 0,
// 1 if its factors are finite after the step else 0 (then zeroed)); nothing is read back by the
// caller until it reads the flags (off the CPU, the bounds cost one synchronisation in the op).
at::Tensor kfac_factors_ema_(at::TensorList a_factors, at::TensorList g_factors,
                             at::TensorList inputs, at::TensorList grad_outputs,
                             at::IntArrayRef layouts, at::ArrayRef<double> grad_scales,
                             at::ArrayRef<double> decays);

// A Conv2d input's validated geometry (kernel/stride/dilation > 0, padding >= 0, output size
// > 0, input [N, C, H, W] floating with N, C > 0): the patch length C * kh * kw and the number of
// output positions OH * OW. Shared by the factor and EKFAC ops.
struct ConvGeometry {
  int64_t patch_dim, positions;
};
ConvGeometry conv_geometry(const at::Tensor& input, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation);

// The smallest patch block a Conv2d factor op unfolds at once (whole samples permitting).
inline constexpr int64_t kConvChunkElements = int64_t{1} << 18;

// Number of samples per chunk when unfolding Conv2d patches: the largest count whose
// [chunk, patch_dim, positions] block holds at most max(factor_dim^2, kConvChunkElements)
// elements (at least 1).
int64_t conv_chunk_samples(int64_t patch_dim, int64_t positions, int64_t factor_dim);

}  // namespace natgrad
