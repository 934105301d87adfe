// Small helpers of natgrad::optim::KFAC's implementation (not part of the API).
#pragma once

#include <torch/nn/module.h>

#include <string>
#include <vector>

namespace natgrad::optim::detail {

/// A module's class name without namespace and "Impl" ("torch::nn::LayerNormImpl" ->
/// "LayerNorm"), as Python's type(module).__name__ in describe().
std::string type_name(const torch::nn::Module& module);

/// Each 0-d bool tensor as a bool, with one host read for all of them.
std::vector<bool> all_true(const std::vector<torch::Tensor>& flags);

/// Every value of the tensors, flattened to float64, with one host read.
std::vector<double> read_values(const std::vector<torch::Tensor>& tensors);

}  // namespace natgrad::optim::detail
