// The per-step K-FAC work for every layer in one call (natgrad.KFAC.step; the C++ frontend).
//
// Layers are given as lists, one entry per layer: the weight gradient as a matrix [d_out, d_in]
// (a Conv2d weight viewed as [C_out, C_in*kh*kw]) and, separately, the bias gradient [d_out] or
// None. The bias is never concatenated to the weight: its column of the packed layout
// (kfac_precondition.h) enters the products as rank-1 terms, so no packed copy is made and the
// directions come back as separate, contiguous weight and bias tensors.
//
// Each layer's direction is the one kfac_precondition_eigen / kfac_precondition_inverse
// computes on the packed gradient, times grad_scale (an AMP unscale: the gradients are read
// unscaled, and the direction and the inner product are rescaled instead). Unlike those ops,
// a non-finite layer does not raise: `stats` reports it and the caller skips the layer, so the
// whole step costs one host read of `stats`:
//   stats [L, 4] float64, per layer: (1 if the gradient is finite else 0,
//                                     1 if the direction (and its denominator) is finite else 0,
//                                     <u_w, g_w>, <u_b, g_b>)   (inner products of the scaled
//   direction and scaled gradient, accumulated in float64; 0 for a layer without bias).
// Momentum (the KL trust region on the momentum-accumulated step needs <b, g> too): given
// `weight_buffers` (one entry per layer, None for a layer without a buffer yet) and optionally
// `bias_buffers`, two columns are appended, computed in the same pass over the gradient as
// <u, g>:  stats [L, 6]: (..., <b_w, g_w>, <b_b, g_b>), g scaled as above, 0 without a buffer.
// A weight buffer is shaped like its weight gradient ([d_out, d_in]), a bias buffer [d_out]; both
// have the gradient's device and dtype. Without buffers (the default) stats stays [L, 4].
// On CPU the inner products and finite flags of a float32/float64 layer come from one fused,
// deterministic pass (fixed-size chunks summed in order, whatever the thread count).
// Decomposition tensors may have another dtype than the gradients (inverse_dtype): the
// gradient is converted to theirs and the directions back. Directions are flushed of
// subnormal values, and gradients holding any are read through a flushed copy
// (common/subnormal.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace natgrad {

// A list of tensors some of which may be absent (the schema's Tensor?[]).
using OptionalTensors = c10::List<std::optional<at::Tensor>>;

struct KfacDirections {
  std::vector<at::Tensor> weight;  // one per layer, [d_out, d_in] like the weight gradient
  std::vector<at::Tensor> bias;    // one per layer that has a bias gradient, in layer order
  at::Tensor stats;                // [L, 4] float64 ([L, 6] with momentum buffers), see above
};

// Eigenbasis form: per layer (V_G, l_G) and (V_A, l_A) from damped_eigh over the packed sizes
// (V_A is [d_in + 1, d_in + 1] for a layer with bias) and its damping.
KfacDirections kfac_directions_eigen(at::TensorList weight_grads,
                                     const c10::List<std::optional<at::Tensor>>& bias_grads,
                                     at::TensorList g_eigenvalues, at::TensorList g_eigenvectors,
                                     at::TensorList a_eigenvalues, at::TensorList a_eigenvectors,
                                     at::ArrayRef<double> damping, bool pi_correction,
                                     double grad_scale,
                                     const OptionalTensors& weight_buffers = OptionalTensors(),
                                     const OptionalTensors& bias_buffers = OptionalTensors());

// Inverse form: per layer the damped inverses from kfac_damped_inverses.
KfacDirections kfac_directions_inverse(at::TensorList weight_grads,
                                       const c10::List<std::optional<at::Tensor>>& bias_grads,
                                       at::TensorList g_inverses, at::TensorList a_inverses,
                                       double grad_scale,
                                       const OptionalTensors& weight_buffers = OptionalTensors(),
                                       const OptionalTensors& bias_buffers = OptionalTensors());

// Heavy-ball step of torch.optim.SGD's form for every parameter, in place:
//   d = direction_scale * u + weight_decay * p;  b <- momentum * b + d;  p <- p - lr * b
// (b = d when `momentum_buffers` is empty, which needs momentum == 0). Buffers are flushed of
// subnormal values (an exponentially decaying buffer otherwise turns subnormal).
void kfac_momentum_step_(at::TensorList params, at::TensorList momentum_buffers,
                         at::TensorList directions, double lr, double momentum, double weight_decay,
                         double direction_scale);

}  // namespace natgrad
