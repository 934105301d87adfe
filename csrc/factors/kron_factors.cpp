#include "factors/kron_factors.h"

#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/subnormal.h"

namespace natgrad {
namespace {

// factor <- beta * factor + alpha * [X; 1][X; 1]^T for X = `cols` [d, r] (one column per row of
// samples). The ones row exists only when `bias`; its products are sums and counts.
// beta == 0 replaces the factor outright: addmm_ ignores its input then (BLAS semantics), and the
// bias row/column are overwritten rather than scaled, so a NaN/Inf factor is fully replaced
// (0 * NaN would keep it).
void add_gram_(at::Tensor& factor, const at::Tensor& cols, bool bias, double beta, double alpha) {
  const int64_t d = cols.size(0);
  at::Tensor block = bias ? factor.narrow(0, 0, d).narrow(1, 0, d) : factor;
  block.addmm_(cols, cols.t(), beta, alpha);
  if (bias) {
    const at::Tensor sums = cols.sum(1);
    const double count = alpha * static_cast<double>(cols.size(1));
    at::Tensor column = factor.narrow(0, 0, d).select(1, d);
    at::Tensor row = factor.select(0, d).narrow(0, 0, d);
    at::Tensor corner = factor.select(0, d).select(0, d);
    if (beta == 0.0) {
      column.copy_(sums).mul_(alpha);
      row.copy_(column);
      corner.fill_(count);
    } else {
      column.mul_(beta).add_(sums, alpha);
      row.mul_(beta).add_(sums, alpha);
      corner.mul_(beta).add_(count);
    }
  }
}

// input [..., d] as a [rows, d] matrix. Explicit row count: reshape({-1, d}) is ambiguous when
// d == 0 (a Linear layer with no input features, whose factor is its bias entry alone).
at::Tensor as_rows(const at::Tensor& input) {
  const int64_t d = input.size(-1);
  const int64_t rows = c10::multiply_integers(input.sizes().slice(0, input.dim() - 1));
  return input.reshape({rows, d});
}

void check_factor(const at::Tensor& factor, const at::Tensor& data, const char* data_name,
                  int64_t dim) {
  checks::floating(factor, "factor");
  TORCH_CHECK(factor.device() == data.device(), "factor must be on the same device as ",
              data_name, " (", data.device(), "), got ", factor.device());
  checks::shape_eq(factor, {dim, dim}, "factor", "square, one row per feature (+1 for bias)");
}

// Validated Conv2d geometry: kernel/stride/dilation > 0, padding >= 0, output size > 0.
struct ConvGeometry {
  int64_t patch_dim, positions;
};

ConvGeometry conv_geometry(const at::Tensor& input, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation) {
  checks::floating(input, "input");
  checks::dim_eq(input, 4, "input", "[N, C, H, W]");
  checks::nonempty_rows(input.size(0), "input");
  TORCH_CHECK(input.size(1) > 0, "input must have at least one channel ([N, C, H, W] with C > 0), ",
              "got shape ", input.sizes());
  auto pair = [](at::IntArrayRef v, const char* name, int64_t lo) {
    TORCH_CHECK(v.size() == 2, name, " must have 2 elements (height, width), got ", v);
    TORCH_CHECK(v[0] >= lo && v[1] >= lo, name, " must be >= ", lo, ", got ", v);
  };
  pair(kernel_size, "kernel_size", 1);
  pair(stride, "stride", 1);
  pair(padding, "padding", 0);
  pair(dilation, "dilation", 1);
  int64_t positions = 1;
  for (int i = 0; i < 2; ++i) {
    const int64_t span = dilation[i] * (kernel_size[i] - 1) + 1;
    const int64_t out = (input.size(2 + i) + 2 * padding[i] - span) / stride[i] + 1;
    TORCH_CHECK(input.size(2 + i) + 2 * padding[i] >= span && out > 0,
                "input spatial size ", input.sizes().slice(2),
                " is too small for kernel_size ", kernel_size, " with dilation ", dilation,
                " and padding ", padding);
    positions *= out;
  }
  return {input.size(1) * kernel_size[0] * kernel_size[1], positions};
}

// Accumulates the Gram matrix of N samples, each contributing a [d, positions] column block
// produced by `block(first, count)` for a chunk of samples, without ever holding all samples'
// blocks at once.
template <class BlockFn>
void add_gram_chunked_(at::Tensor& factor, int64_t samples, int64_t d, int64_t positions,
                       bool bias, double decay, double alpha, BlockFn block) {
  const int64_t chunk = conv_chunk_samples(d, positions, factor.size(0));
  for (int64_t first = 0; first < samples; first += chunk) {
    const int64_t count = std::min(chunk, samples - first);
    const at::Tensor cols = block(first, count).to(factor.scalar_type())  // [count, d, pos]
                                .transpose(0, 1)
                                .reshape({d, count * positions});
    add_gram_(factor, cols, bias, first == 0 ? decay : 1.0, alpha);
  }
}

}  // namespace

int64_t conv_chunk_samples(int64_t patch_dim, int64_t positions, int64_t factor_dim) {
  return std::max<int64_t>(1, (factor_dim * factor_dim) / std::max<int64_t>(1, patch_dim * positions));
}

void linear_act_factor_ema_(at::Tensor& factor, const at::Tensor& input, bool bias,
                            double decay) {
  checks::floating(input, "input");
  checks::dim_ge(input, 1, "input", "[..., in_features]");
  checks::decay(decay);
  const int64_t d = input.size(-1);
  check_factor(factor, input, "input", d + (bias ? 1 : 0));
  const at::Tensor rows = without_subnormals(as_rows(input).to(factor.scalar_type()));
  checks::nonempty_rows(rows.size(0), "input");
  add_gram_(factor, rows.t(), bias, decay, (1.0 - decay) / static_cast<double>(rows.size(0)));
  flush_subnormal_(factor);
}

at::Tensor linear_act_factor(const at::Tensor& input, bool bias) {
  checks::floating(input, "input");
  checks::dim_ge(input, 1, "input", "[..., in_features]");
  const int64_t dim = input.size(-1) + (bias ? 1 : 0);
  at::Tensor factor = at::zeros({dim, dim}, input.options());
  linear_act_factor_ema_(factor, input, bias, 0.0);
  return factor;
}

void linear_grad_factor_ema_(at::Tensor& factor, const at::Tensor& grad_output,
                             double grad_scale, double decay) {
  checks::floating(grad_output, "grad_output");
  checks::dim_ge(grad_output, 1, "grad_output", "[..., out_features]");
  checks::grad_scale(grad_scale);
  checks::decay(decay);
  const int64_t d = grad_output.size(-1);
  check_factor(factor, grad_output, "grad_output", d);
  const at::Tensor rows = without_subnormals(as_rows(grad_output).to(factor.scalar_type()));
  checks::nonempty_rows(rows.size(0), "grad_output");
  const double alpha = (1.0 - decay) * grad_scale * grad_scale / static_cast<double>(rows.size(0));
  add_gram_(factor, rows.t(), /*bias=*/false, decay, alpha);
  flush_subnormal_(factor);
}

at::Tensor linear_grad_factor(const at::Tensor& grad_output, double grad_scale) {
  checks::floating(grad_output, "grad_output");
  checks::dim_ge(grad_output, 1, "grad_output", "[..., out_features]");
  const int64_t d = grad_output.size(-1);
  at::Tensor factor = at::zeros({d, d}, grad_output.options());
  linear_grad_factor_ema_(factor, grad_output, grad_scale, 0.0);
  return factor;
}

void conv2d_act_factor_ema_(at::Tensor& factor, const at::Tensor& input,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, bool bias,
                            double decay) {
  const ConvGeometry g = conv_geometry(input, kernel_size, stride, padding, dilation);
  checks::decay(decay);
  check_factor(factor, input, "input", g.patch_dim + (bias ? 1 : 0));
  const int64_t samples = input.size(0);
  const double alpha = (1.0 - decay) / static_cast<double>(samples * g.positions);
  const at::Tensor clean = without_subnormals(input);
  add_gram_chunked_(factor, samples, g.patch_dim, g.positions, bias, decay, alpha,
                    [&](int64_t first, int64_t count) {
                      return at::im2col(clean.narrow(0, first, count), kernel_size, dilation,
                                        padding, stride);
                    });
  flush_subnormal_(factor);
}

at::Tensor conv2d_act_factor(const at::Tensor& input, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, bool bias) {
  const ConvGeometry g = conv_geometry(input, kernel_size, stride, padding, dilation);
  const int64_t dim = g.patch_dim + (bias ? 1 : 0);
  at::Tensor factor = at::zeros({dim, dim}, input.options());
  conv2d_act_factor_ema_(factor, input, kernel_size, stride, padding, dilation, bias, 0.0);
  return factor;
}

void conv2d_grad_factor_ema_(at::Tensor& factor, const at::Tensor& grad_output,
                             double grad_scale, double decay) {
  checks::floating(grad_output, "grad_output");
  checks::dim_eq(grad_output, 4, "grad_output", "[N, C_out, OH, OW]");
  checks::nonempty_rows(grad_output.size(0) * grad_output.size(2) * grad_output.size(3),
                        "grad_output");
  checks::grad_scale(grad_scale);
  checks::decay(decay);
  const int64_t d = grad_output.size(1);
  check_factor(factor, grad_output, "grad_output", d);
  const int64_t samples = grad_output.size(0);
  const int64_t positions = grad_output.size(2) * grad_output.size(3);
  const double alpha =
      (1.0 - decay) * grad_scale * grad_scale / static_cast<double>(samples * positions);
  const at::Tensor clean = without_subnormals(grad_output);
  add_gram_chunked_(factor, samples, d, positions, /*bias=*/false, decay, alpha,
                    [&](int64_t first, int64_t count) {
                      return clean.narrow(0, first, count).reshape({count, d, positions});
                    });
  flush_subnormal_(factor);
}

at::Tensor conv2d_grad_factor(const at::Tensor& grad_output, double grad_scale) {
  checks::floating(grad_output, "grad_output");
  checks::dim_eq(grad_output, 4, "grad_output", "[N, C_out, OH, OW]");
  const int64_t d = grad_output.size(1);
  at::Tensor factor = at::zeros({d, d}, grad_output.options());
  conv2d_grad_factor_ema_(factor, grad_output, grad_scale, 0.0);
  return factor;
}

// ATen compositions (addmm_, im2col, sum): one registration serves every device (CPU, CUDA, ...).
// The Meta key is served by the Python fake kernels (python/natgrad/ops/factors.py).
TORCH_LIBRARY_IMPL(natgrad, CompositeExplicitAutograd, m) {
  m.impl("linear_act_factor", &linear_act_factor);
  m.impl("linear_act_factor_ema_", &linear_act_factor_ema_);
  m.impl("conv2d_act_factor", &conv2d_act_factor);
  m.impl("conv2d_act_factor_ema_", &conv2d_act_factor_ema_);
  m.impl("linear_grad_factor", &linear_grad_factor);
  m.impl("linear_grad_factor_ema_", &linear_grad_factor_ema_);
  m.impl("conv2d_grad_factor", &conv2d_grad_factor);
  m.impl("conv2d_grad_factor_ema_", &conv2d_grad_factor_ema_);
}

}  // namespace natgrad
