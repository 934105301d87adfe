#include "common/subnormal.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace natgrad {
namespace {

template <typename T>
bool any_subnormal_contiguous(const T* data, int64_t n) {
  const T tiny = std::numeric_limits<T>::min();
  bool found = false;
  for (int64_t i = 0; i < n && !found; i += 4096) {  // early exit per block of 4096
    const int64_t end = std::min(n, i + 4096);
    int hits = 0;
    for (int64_t j = i; j < end; ++j) hits += (std::abs(data[j]) < tiny) & (data[j] != T(0));
    found = hits > 0;
  }
  return found;
}

template <typename T>
void flush_contiguous(T* data, int64_t n) {
  const T tiny = std::numeric_limits<T>::min();
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T v = data[i];
      // |v| < tiny is false for NaN and for +-Inf, true for +-0 (rewritten as +0: harmless).
      if (std::abs(v) < tiny) data[i] = T(0);
    }
  });
}

}  // namespace

at::Tensor& flush_subnormal_(at::Tensor& t) {
  if (!t.defined() || !at::isFloatingType(t.scalar_type()) || t.numel() == 0) return t;
  if (t.device().is_cpu() && t.is_contiguous() &&
      (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)) {
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "flush_subnormal_",
                               [&] { flush_contiguous(t.data_ptr<scalar_t>(), t.numel()); });
    return t;
  }
  double tiny = static_cast<double>(std::numeric_limits<float>::min());  // float, bfloat16
  if (t.scalar_type() == at::kDouble) tiny = std::numeric_limits<double>::min();
  if (t.scalar_type() == at::kHalf) tiny = 6.103515625e-05;  // 2^-14
  t.masked_fill_(t.abs() < tiny, 0.0);
  return t;
}

void flush_subnormal_(std::vector<at::Tensor>& tensors) {
  for (at::Tensor& t : tensors) flush_subnormal_(t);
}

bool has_subnormal(const at::Tensor& t) {
  if (!t.defined() || !at::isFloatingType(t.scalar_type()) || t.numel() == 0) return false;
  if (t.device().is_cpu() && t.is_contiguous() &&
      (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)) {
    bool found = false;
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "has_subnormal", [&] {
      found = any_subnormal_contiguous(t.data_ptr<scalar_t>(), t.numel());
    });
    return found;
  }
  const double tiny = t.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                      : t.scalar_type() == at::kHalf ? 6.103515625e-05
                                                     : std::numeric_limits<float>::min();
  return t.abs().lt(tiny).logical_and_(t.ne(0)).any().item<bool>();
}

at::Tensor without_subnormals(const at::Tensor& t) {
  if (!has_subnormal(t)) return t;
  at::Tensor copy = t.clone(at::MemoryFormat::Contiguous);
  flush_subnormal_(copy);
  return copy;
}

}  // namespace natgrad
