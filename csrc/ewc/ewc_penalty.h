// The diagonal-Fisher EWC penalty and its gradient in one pass over memory.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace natgrad {

// penalty = sum_t sum_i F_t,i (theta_t,i - anchor_t,i)^2 over the tensors t of the lists, and
// grads_t = 2 F_t (theta_t - anchor_t), computed together by one fused loop per tensor (each
// element read once), accumulated in float64. All tensors share one dtype and device; fisher[t]
// and anchor[t] have params[t]'s shape. No lambda or 1/2 is applied: callers scale. The fused
// loop serves CPU tensors; tensors on another device are handed to ewc_penalty_composite.
std::tuple<at::Tensor, std::vector<at::Tensor>> ewc_penalty(at::TensorList params,
                                                            at::TensorList fisher,
                                                            at::TensorList anchor);

// The same penalty and gradients as an ATen composition, for tensors on any device (the op's
// kernel everywhere but the CPU, where the fused loop above serves): per tensor, elementwise
// passes in the dtype's math type (float32 for half/bfloat16) and a float64-accumulated sum.
std::tuple<at::Tensor, std::vector<at::Tensor>> ewc_penalty_composite(at::TensorList params,
                                                                      at::TensorList fisher,
                                                                      at::TensorList anchor);

}  // namespace natgrad
