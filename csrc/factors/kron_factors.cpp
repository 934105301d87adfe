#include "factors/kron_factors.h"

#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/subnormal.h"
#include "kfac/kfac_rules.h"

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
  TORCH_CHECK(factor.device() == data.device(), "factor must be on the same device as ", data_name,
              " (", data.device(), "), got ", factor.device());
  checks::shape_eq(factor, {dim, dim}, "factor", "square, one row per feature (+1 for bias)");
}

}  // namespace

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
    TORCH_CHECK(input.size(2 + i) + 2 * padding[i] >= span && out > 0, "input spatial size ",
                input.sizes().slice(2), " is too small for kernel_size ", kernel_size,
                " with dilation ", dilation, " and padding ", padding);
    positions *= out;
  }
  return {input.size(1) * kernel_size[0] * kernel_size[1], positions};
}

namespace {

// Accumulates the Gram matrix of N samples, each contributing a [d, positions] column block
// produced by `block(first, count)` for a chunk of samples, without ever holding all samples'
// blocks at once.
template <class BlockFn>
void add_gram_chunked_(at::Tensor& factor, int64_t samples, int64_t d, int64_t positions, bool bias,
                       double decay, double alpha, BlockFn block) {
  const int64_t chunk = conv_chunk_samples(d, positions, factor.size(0));
  for (int64_t first = 0; first < samples; first += chunk) {
    const int64_t count = std::min(chunk, samples - first);
    const at::Tensor cols = block(first, count)
                                .to(factor.scalar_type())  // [count, d, pos]
                                .transpose(0, 1)
                                .reshape({d, count * positions});
    add_gram_(factor, cols, bias, first == 0 ? decay : 1.0, alpha);
  }
}

}  // namespace

int64_t conv_chunk_samples(int64_t patch_dim, int64_t positions, int64_t factor_dim) {
  const int64_t budget = std::max(factor_dim * factor_dim, kConvChunkElements);
  return std::max<int64_t>(1, budget / std::max<int64_t>(1, patch_dim * positions));
}

void linear_act_factor_ema_(at::Tensor& factor, const at::Tensor& input, bool bias, double decay) {
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

void linear_grad_factor_ema_(at::Tensor& factor, const at::Tensor& grad_output, double grad_scale,
                             double decay) {
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

void conv2d_grad_factor_ema_(at::Tensor& factor, const at::Tensor& grad_output, double grad_scale,
                             double decay) {
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

namespace {

constexpr int64_t kLayout = 9;  // integers per layer in kfac_factors_ema_'s `layouts`

std::string at_layer(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

// One layer of kfac_factors_ema_, validated: its geometry and the row counts of its bound.
struct FactorLayer {
  bool bias, conv;
  std::array<int64_t, 2> kernel, stride, padding, dilation;
  double input_rows, grad_rows;
};

FactorLayer checked_layer(size_t i, const at::Tensor& a, const at::Tensor& g, const at::Tensor& x,
                          const at::Tensor& dy, const int64_t* layout, double grad_scale,
                          double decay) {
  FactorLayer l{};
  TORCH_CHECK(layout[0] == 0 || layout[0] == 1, "layouts[", i * kLayout, "] (layer ", i,
              "'s bias flag) must be 0 or 1, got ", layout[0]);
  l.bias = layout[0] == 1;
  for (int j = 0; j < 2; ++j) {
    l.kernel[j] = layout[1 + j];
    l.stride[j] = layout[3 + j];
    l.padding[j] = layout[5 + j];
    l.dilation[j] = layout[7 + j];
  }
  l.conv = l.kernel[0] != 0 || l.kernel[1] != 0;
  const std::string an = at_layer("a_factors", i), gn = at_layer("g_factors", i);
  const std::string xn = at_layer("inputs", i), dn = at_layer("grad_outputs", i);
  checks::floating(a, an.c_str());
  checks::same_device_dtype(g, a, gn.c_str(), an.c_str());
  checks::floating(x, xn.c_str());
  checks::floating(dy, dn.c_str());
  TORCH_CHECK(x.device() == a.device() && dy.device() == a.device(), "layer ", i,
              ": inputs and grad_outputs must be on the factors' device (", a.device(), "), got ",
              x.device(), " and ", dy.device());
  checks::grad_scale(grad_scale);
  checks::decay(decay);
  int64_t a_dim = 0, g_dim = 0;
  if (l.conv) {
    const ConvGeometry geo = conv_geometry(x, l.kernel, l.stride, l.padding, l.dilation);
    checks::dim_eq(dy, 4, dn.c_str(), "[N, C_out, OH, OW]");
    a_dim = geo.patch_dim;
    g_dim = dy.size(1);
    l.input_rows = static_cast<double>(x.size(0) * geo.positions);
    const int64_t passes = std::max<int64_t>(dy.size(0) / x.size(0), 1);
    l.grad_rows = l.input_rows * static_cast<double>(passes);
  } else {
    TORCH_CHECK(l.kernel == l.stride && l.stride == l.padding && l.padding == l.dilation,
                "layouts of Linear layer ", i, " must be zero after its bias flag, got ",
                at::IntArrayRef(layout, kLayout));
    checks::dim_ge(x, 1, xn.c_str(), "[..., in_features]");
    checks::dim_ge(dy, 1, dn.c_str(), "[..., out_features]");
    a_dim = x.size(-1);
    g_dim = dy.size(-1);
    l.input_rows = static_cast<double>(as_rows(x).size(0));
    l.grad_rows = static_cast<double>(as_rows(dy).size(0));
  }
  checks::nonempty_rows(static_cast<int64_t>(l.input_rows), xn.c_str());
  checks::nonempty_rows(static_cast<int64_t>(l.grad_rows), dn.c_str());
  checks::shape_eq(a, {a_dim + l.bias, a_dim + l.bias}, an.c_str(),
                   "square, one row per input feature (+1 for bias)");
  checks::shape_eq(g, {g_dim, g_dim}, gn.c_str(), "square, one row per output feature");
  return l;
}

// max |t| as a 0-d float64 tensor (NaN if t holds one; 0 if t is empty).
at::Tensor peak(const at::Tensor& t) {
  if (t.numel() == 0) return at::zeros({}, t.options().dtype(at::kDouble));
  const auto [low, high] = at::aminmax(t);
  return at::maximum(high, low.neg()).to(at::kDouble);
}

}  // namespace

at::Tensor kfac_factors_ema_(at::TensorList a_factors, at::TensorList g_factors,
                             at::TensorList inputs, at::TensorList grad_outputs,
                             at::IntArrayRef layouts, at::ArrayRef<double> grad_scales,
                             at::ArrayRef<double> decays) {
  const size_t layers = a_factors.size();
  for (const auto& [n, name] :
       {std::pair{g_factors.size(), "g_factors"}, std::pair{inputs.size(), "inputs"},
        std::pair{grad_outputs.size(), "grad_outputs"},
        std::pair{grad_scales.size(), "grad_scales"}, std::pair{decays.size(), "decays"}}) {
    TORCH_CHECK(n == layers, name, " must hold one entry per layer (", layers, " a_factors), got ",
                n);
  }
  TORCH_CHECK(layouts.size() == layers * kLayout, "layouts must hold ", kLayout,
              " integers per layer (bias, kernel, stride, padding, dilation), i.e. ",
              layers * kLayout, ", got ", layouts.size());
  std::vector<FactorLayer> geo;
  for (size_t i = 0; i < layers; ++i) {
    geo.push_back(checked_layer(i, a_factors[i], g_factors[i], inputs[i], grad_outputs[i],
                                layouts.data() + i * kLayout, grad_scales[i], decays[i]));
  }
  if (layers == 0) return at::zeros({0, 2}, at::TensorOptions().dtype(at::kDouble));
  // The bounds: every layer's two peaks, read back at once.
  std::vector<at::Tensor> peaks;
  for (size_t i = 0; i < layers; ++i) {
    peaks.push_back(peak(inputs[i]));
    peaks.push_back(peak(grad_outputs[i]));
  }
  const at::Tensor host = at::stack(peaks).to(at::kCPU);
  const double* pk = host.const_data_ptr<double>();
  std::vector<at::Tensor> updated, finite;
  for (size_t i = 0; i < layers; ++i) {
    at::Tensor a = a_factors[i], g = g_factors[i];
    const FactorLayer& l = geo[i];
    const double px = pk[2 * i], pg = pk[2 * i + 1];
    // The statistics bound (kfac/kfac_rules.h): NaN and Inf fail it.
    const bool ok =
        kfac::within_bound(px, l.input_rows, a.scalar_type()) &&
        kfac::within_bound(pg, kfac::grad_count(static_cast<int64_t>(l.grad_rows), grad_scales[i]),
                           a.scalar_type());
    updated.push_back(at::scalar_tensor(ok ? 1.0 : 0.0, at::TensorOptions().dtype(at::kDouble)));
    if (!ok) {
      finite.push_back(at::ones({}, a.options().dtype(at::kDouble)));
      continue;
    }
    if (l.conv) {
      conv2d_act_factor_ema_(a, inputs[i], l.kernel, l.stride, l.padding, l.dilation, l.bias,
                             decays[i]);
      conv2d_grad_factor_ema_(g, grad_outputs[i], grad_scales[i], decays[i]);
    } else {
      linear_act_factor_ema_(a, inputs[i], l.bias, decays[i]);
      linear_grad_factor_ema_(g, grad_outputs[i], grad_scales[i], decays[i]);
    }
    const at::Tensor fine =
        checks::finite_flag(a.diagonal()).logical_and_(checks::finite_flag(g.diagonal()));
    if (a.device().is_cpu()) {  // a read costs nothing here
      if (!fine.item<bool>()) {
        a.zero_();
        g.zero_();
      }
    } else {  // no synchronisation: zero through a broadcast mask
      const at::Tensor bad = fine.logical_not();
      a.masked_fill_(bad, 0.0);
      g.masked_fill_(bad, 0.0);
    }
    finite.push_back(fine.to(at::kDouble));
  }
  const at::Tensor device_updated = at::stack(updated).to(a_factors[0].device());
  return at::stack({device_updated, at::stack(finite)}, 1);
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
  m.impl("kfac_factors_ema_", &kfac_factors_ema_);
}

}  // namespace natgrad
