#include "ewc/ewc_penalty.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <functional>

#include "common/checks.h"

namespace natgrad {
namespace {

constexpr int64_t kGrain = 1 << 15;

void check_lists(at::TensorList params, at::TensorList fisher, at::TensorList anchor) {
  TORCH_CHECK(!params.empty(), "params must hold at least one tensor");
  TORCH_CHECK(fisher.size() == params.size(), "fisher must hold one tensor per parameter (",
              params.size(), "), got ", fisher.size());
  TORCH_CHECK(anchor.size() == params.size(), "anchor must hold one tensor per parameter (",
              params.size(), "), got ", anchor.size());
  const at::Tensor& ref = params[0];
  checks::floating(ref, "params[0]");
  for (size_t t = 0; t < params.size(); ++t) {
    for (const auto& [list, name] :
         {std::pair{params, "params"}, std::pair{fisher, "fisher"}, std::pair{anchor, "anchor"}}) {
      const at::Tensor& x = list[t];
      TORCH_CHECK(x.defined(), name, "[", t, "] must be a defined tensor");
      TORCH_CHECK(x.scalar_type() == ref.scalar_type() && x.device() == ref.device(), name, "[", t,
                  "] must have dtype ", ref.scalar_type(), " on ", ref.device(),
                  " like params[0], got ", x.scalar_type(), " on ", x.device());
      TORCH_CHECK(x.sizes() == params[t].sizes(), name, "[", t, "] must have the shape of params[",
                  t, "] ", params[t].sizes(), ", got ", x.sizes());
    }
  }
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> ewc_penalty(at::TensorList params,
                                                            at::TensorList fisher,
                                                            at::TensorList anchor) {
  check_lists(params, fisher, anchor);
  if (!params[0].is_cpu()) return ewc_penalty_composite(params, fisher, anchor);
  double total = 0.0;
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor theta = params[t].contiguous();
    const at::Tensor f = fisher[t].contiguous();
    const at::Tensor star = anchor[t].contiguous();
    at::Tensor grad = at::empty_like(theta, at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, theta.scalar_type(), "natgrad::ewc_penalty", [&] {
          using opmath_t = at::opmath_type<scalar_t>;
          const scalar_t* tp = theta.const_data_ptr<scalar_t>();
          const scalar_t* fp = f.const_data_ptr<scalar_t>();
          const scalar_t* sp = star.const_data_ptr<scalar_t>();
          scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
          total += at::parallel_reduce(
              0, theta.numel(), kGrain, 0.0,
              [&](int64_t begin, int64_t end, double acc) {
                for (int64_t i = begin; i < end; ++i) {
                  const opmath_t diff = static_cast<opmath_t>(tp[i]) - static_cast<opmath_t>(sp[i]);
                  const opmath_t weighted = static_cast<opmath_t>(fp[i]) * diff;
                  gp[i] = static_cast<scalar_t>(weighted + weighted);
                  acc += static_cast<double>(weighted) * static_cast<double>(diff);
                }
                return acc;
              },
              std::plus<double>());
        });
    grads.push_back(std::move(grad));
  }
  // Through float64, so a penalty beyond the dtype's range becomes inf (as plain torch gives).
  return {
      at::scalar_tensor(total, params[0].options().dtype(at::kDouble)).to(params[0].scalar_type()),
      std::move(grads)};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> ewc_penalty_composite(at::TensorList params,
                                                                      at::TensorList fisher,
                                                                      at::TensorList anchor) {
  check_lists(params, fisher, anchor);
  const at::ScalarType dtype = params[0].scalar_type();
  const at::ScalarType opmath = at::toOpMathType(dtype);
  at::Tensor total;
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor diff = params[t].to(opmath) - anchor[t].to(opmath);
    const at::Tensor weighted = fisher[t].to(opmath) * diff;
    grads.push_back(weighted.mul(2).to(dtype).contiguous());
    const at::Tensor term = at::sum(weighted * diff, at::kDouble);
    total = total.defined() ? total.add_(term) : term;
  }
  return {total.to(dtype), std::move(grads)};
}

// The fused loop reads raw CPU memory: it serves CPU tensors. Every other device gets the ATen
// composition (CompositeExplicitAutograd; a backend kernel takes precedence over it), and Meta
// the Python fake kernel (python/natgrad/ops/ewc.py).
TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("ewc_penalty", &ewc_penalty); }
TORCH_LIBRARY_IMPL(natgrad, CompositeExplicitAutograd, m) {
  m.impl("ewc_penalty", &ewc_penalty_composite);
}

}  // namespace natgrad
