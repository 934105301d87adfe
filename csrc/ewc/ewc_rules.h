// The rules of elastic weight consolidation that both frontends share: natgrad.EWC (Python,
// through the torch.ops.natgrad.ewc_* ops) and natgrad::EWC (the C++ frontend, calling these
// functions directly). The penalty itself is ewc_penalty.h's.
//
//   options        lambda finite and >= 0; gamma in [0, 1]; mode "separate" or "online"
//   running mean   a task's Fisher is the mean over every sample of its batches
//   online merge   online EWC keeps one task: F <- gamma F_old + F_new
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace natgrad::ewc {

// TORCH_CHECK_VALUE naming the first invalid option ("Invalid lambda_: ..." with the Python
// spelling of the penalty's weight when `lambda_name` says so).
void check_options(double lambda, double gamma, const std::string& mode,
                   const std::string& lambda_name = "lambda");

// The mean over seen + n samples from `old` (the mean over the first `seen`) and `fresh` (the
// mean over the next n): (seen old + n fresh) / (seen + n); `fresh` when old is undefined.
at::Tensor running_mean(const at::Tensor& old, const at::Tensor& fresh, int64_t n, int64_t seen);

// Online EWC's Fisher after a new task: gamma * old + fresh.
at::Tensor online_merge(double gamma, const at::Tensor& old, const at::Tensor& fresh);

}  // namespace natgrad::ewc
