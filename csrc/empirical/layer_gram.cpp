#include "empirical/layer_gram.h"

#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "linalg/psd_linalg.h"

namespace natgrad {
namespace {

// Elements of one chunk's temporaries in the pairwise and unfolded forms (32 MB of float64).
constexpr int64_t kChunkElements = int64_t{1} << 22;

// Passes P of grad_output's R = P * N rows.
int64_t passes_of(int64_t samples, int64_t rows, const char* input_name) {
  TORCH_CHECK(rows > 0 && rows % samples == 0, "grad_output must have a positive multiple of ",
              input_name, ".size(0) = ", samples, " rows (one block of samples per pass), got ",
              rows);
  return rows / samples;
}

// Rows of `t` [N, ...] repeated for P passes ([P * N, ...], row r is sample r % N).
at::Tensor tiled(const at::Tensor& t, int64_t passes) {
  if (passes == 1) return t;
  std::vector<int64_t> reps(t.dim(), 1);
  reps[0] = passes;
  return t.repeat(reps);
}

// Per-row weights w [R] summed over passes into per-sample-position weights of g [R, M]:
// sum_p w_(pN+n) g_(pN+n) -> [N, M].
at::Tensor pass_sum(const at::Tensor& g, const at::Tensor& weights, int64_t passes) {
  const int64_t samples = g.size(0) / passes;
  return (g.reshape({passes, samples, -1}) * weights.reshape({passes, samples, 1})).sum(0);
}

// (U v)_r = <g_r, y_(r%N)> for g [R, ...] and y holding N samples' values of g's per-row size.
at::Tensor row_dots(const at::Tensor& g, const at::Tensor& y, int64_t passes) {
  const int64_t samples = g.size(0) / passes;
  return (g.reshape({passes, samples, -1}) * y.reshape({1, samples, -1})).sum(-1).reshape({-1});
}

void check_weights(const at::Tensor& weights, const at::Tensor& grad_output) {
  checks::same_device_dtype(weights, grad_output, "weights", "grad_output");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == grad_output.size(0),
              "weights must have shape [", grad_output.size(0),
              "] (one entry per row of grad_output), got ", weights.sizes());
}

// sum_{t,u} (K_act)_{rt,su} (g_rt . g_su) over rows r, s, where `act(first, count)` returns the
// activation products of rows [first, first + count) against every row ([count * T, R * T]).
template <class ActFn>
at::Tensor pairwise_gram(const at::Tensor& g, ActFn act) {
  const int64_t rows = g.size(0), positions = g.size(1);
  const at::Tensor flat = g.reshape({rows * positions, g.size(2)});
  at::Tensor gram = at::empty({rows, rows}, g.options());
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / (positions * rows * positions));
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t count = std::min(chunk, rows - first);
    at::Tensor prod = act(first, count);
    prod.mul_(at::matmul(flat.narrow(0, first * positions, count * positions), flat.t()));
    gram.narrow(0, first, count).copy_(prod.view({count, positions, rows, positions}).sum({1, 3}));
  }
  return gram;
}

// The bias rows' Gram (sum_t g_rt) . (sum_u g_su), added to `gram`.
at::Tensor add_bias_gram(at::Tensor gram, const at::Tensor& g_sums) {
  return gram.addmm_(g_sums, g_sums.t());
}

struct LinearRows {
  at::Tensor x;  // [N, T, d_in]
  at::Tensor g;  // [R, T, d_out]
  int64_t samples, passes, positions;
};

LinearRows linear_rows(const at::Tensor& input, const at::Tensor& grad_output) {
  checks::floating(input, "input");
  checks::dim_ge(input, 2, "input", "[N, ..., in_features] (dim 0 indexes samples)");
  checks::same_device_dtype(grad_output, input, "grad_output", "input");
  TORCH_CHECK(grad_output.dim() == input.dim() && grad_output.sizes().slice(1, input.dim() - 2) ==
                                                      input.sizes().slice(1, input.dim() - 2),
              "grad_output must have shape [R, ", input.sizes().slice(1, input.dim() - 2),
              ", out_features] (the positions of input ", input.sizes(), "), got ",
              grad_output.sizes());
  checks::nonempty_rows(input.size(0), "input");
  const int64_t n = input.size(0), rows = grad_output.size(0);
  const int64_t passes = passes_of(n, rows, "input");
  const int64_t t = c10::multiply_integers(input.sizes().slice(1, input.dim() - 2));
  return {input.reshape({n, t, input.size(-1)}),
          grad_output.reshape({rows, t, grad_output.size(-1)}), n, passes, t};
}

struct ConvShape {
  int64_t out_h, out_w;
};

// Validates a Conv2d's hook data and geometry; returns the output size.
ConvShape conv_rows(const at::Tensor& input, const at::Tensor& grad_output,
                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation) {
  checks::floating(input, "input");
  checks::dim_eq(input, 4, "input", "[N, C_in, H, W]");
  checks::same_device_dtype(grad_output, input, "grad_output", "input");
  checks::dim_eq(grad_output, 4, "grad_output", "[R, C_out, H_out, W_out]");
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
  int64_t out[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t span = dilation[i] * (kernel_size[i] - 1) + 1;
    out[i] = (input.size(2 + i) + 2 * padding[i] - span) / stride[i] + 1;
    TORCH_CHECK(input.size(2 + i) + 2 * padding[i] >= span && out[i] > 0, "input spatial size ",
                input.sizes().slice(2), " is too small for kernel_size ", kernel_size,
                " with dilation ", dilation, " and padding ", padding);
  }
  TORCH_CHECK(grad_output.size(2) == out[0] && grad_output.size(3) == out[1],
              "grad_output must have the convolution's output size [", out[0], ", ", out[1],
              "] in its last two dims, got ", grad_output.sizes());
  passes_of(input.size(0), grad_output.size(0), "input");
  return {out[0], out[1]};
}

struct EmbeddingRows {
  at::Tensor idx;  // [N, T] int64
  at::Tensor g;    // [R, T, dim]
  int64_t samples, passes, positions;
};

EmbeddingRows embedding_rows(const at::Tensor& indices, const at::Tensor& grad_output) {
  TORCH_CHECK(indices.defined() &&
                  (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt),
              "indices must be an int64 or int32 tensor of token ids, got ",
              indices.defined() ? c10::toString(indices.scalar_type()) : "undefined");
  checks::dim_ge(indices, 1, "indices", "[N, ...] (dim 0 indexes samples)");
  checks::floating(grad_output, "grad_output");
  TORCH_CHECK(grad_output.device() == indices.device(),
              "grad_output must be on the same device as indices (", indices.device(), "), got ",
              grad_output.device());
  TORCH_CHECK(grad_output.dim() == indices.dim() + 1 &&
                  grad_output.sizes().slice(1, indices.dim() - 1) == indices.sizes().slice(1),
              "grad_output must have shape [R, ", indices.sizes().slice(1),
              ", embedding_dim] (the positions of indices ", indices.sizes(), "), got ",
              grad_output.sizes());
  checks::nonempty_rows(indices.size(0), "indices");
  const int64_t n = indices.size(0), rows = grad_output.size(0);
  const int64_t passes = passes_of(n, rows, "indices");
  const int64_t t = c10::multiply_integers(indices.sizes().slice(1));
  return {indices.reshape({n, t}).to(at::kLong),
          grad_output.reshape({rows, t, grad_output.size(-1)}), n, passes, t};
}

void check_index_range(const at::Tensor& idx, int64_t num_embeddings) {
  if (idx.numel() == 0) return;
  const auto [low, high] = at::aminmax(idx);
  const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < num_embeddings, "indices must lie in [0, ", num_embeddings,
              ") (num_embeddings), got values in [", lo, ", ", hi, "]");
}

}  // namespace

// ---- nn.Linear --------------------------------------------------------------------------------

at::Tensor linear_gram(const at::Tensor& input, const at::Tensor& grad_output, bool bias) {
  const LinearRows L = linear_rows(input, grad_output);
  const int64_t rows = L.g.size(0), t = L.positions, d_in = L.x.size(2), d_out = L.g.size(2);
  if (t == 1) {  // (X X^T + [bias]) o (G G^T)
    const at::Tensor x = L.x.reshape({L.samples, d_in}), g = L.g.reshape({rows, d_out});
    at::Tensor act = at::matmul(x, x.t());
    if (L.passes > 1) act = act.repeat({L.passes, L.passes});
    if (bias) act.add_(1.0);
    return act.mul_(at::matmul(g, g.t()));
  }
  const double r = static_cast<double>(rows), tt = static_cast<double>(t);
  const double pairwise = r * r * tt * tt * static_cast<double>(d_in + d_out);
  const double per_sample = r * (tt + r) * static_cast<double>(d_in * d_out);
  const at::Tensor x = tiled(L.x, L.passes);  // [R, T, d_in]
  at::Tensor gram;
  if (per_sample < pairwise) {  // this layer's per-sample gradients [R, d_out * d_in]
    const at::Tensor u = at::bmm(L.g.transpose(1, 2), x).reshape({rows, d_out * d_in});
    gram = at::matmul(u, u.t());
  } else {
    const at::Tensor xf = x.reshape({rows * t, d_in});
    gram = pairwise_gram(L.g, [&](int64_t first, int64_t count) {
      return at::matmul(xf.narrow(0, first * t, count * t), xf.t());
    });
  }
  return bias ? add_bias_gram(gram, L.g.sum(1)) : gram;
}

at::Tensor linear_rows_mv(const at::Tensor& input, const at::Tensor& grad_output,
                          const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const LinearRows L = linear_rows(input, grad_output);
  const int64_t d_in = L.x.size(2), d_out = L.g.size(2);
  checks::same_device_dtype(weight, input, "weight", "input");
  checks::shape_eq(weight, {d_out, d_in}, "weight", "[out_features, in_features] of the layer");
  at::Tensor y = at::matmul(L.x.reshape({L.samples * L.positions, d_in}), weight.t());
  if (bias.has_value() && bias->defined()) {
    checks::same_device_dtype(*bias, input, "bias", "input");
    checks::shape_eq(*bias, {d_out}, "bias", "[out_features]");
    y.add_(*bias);
  }
  return row_dots(L.g, y, L.passes);
}

std::tuple<at::Tensor, at::Tensor> linear_rows_tmv(const at::Tensor& input,
                                                   const at::Tensor& grad_output,
                                                   const at::Tensor& weights) {
  const LinearRows L = linear_rows(input, grad_output);
  check_weights(weights, grad_output);
  const int64_t d_in = L.x.size(2), d_out = L.g.size(2);
  const at::Tensor gw = pass_sum(L.g, weights, L.passes).reshape({L.samples * L.positions, d_out});
  return {at::matmul(gw.t(), L.x.reshape({L.samples * L.positions, d_in})), gw.sum(0)};
}

// ---- nn.Conv2d --------------------------------------------------------------------------------

at::Tensor conv2d_gram(const at::Tensor& input, const at::Tensor& grad_output,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, bool bias) {
  const ConvShape s = conv_rows(input, grad_output, kernel_size, stride, padding, dilation);
  const int64_t n = input.size(0), rows = grad_output.size(0), passes = rows / n;
  const int64_t c_out = grad_output.size(1), positions = s.out_h * s.out_w;
  const int64_t d_in = input.size(1) * kernel_size[0] * kernel_size[1];
  // Per-sample gradients of this layer, [R, c_out * d_in], from a chunk of samples' patches at
  // a time (the unfold of the whole batch is never held).
  at::Tensor u = at::empty({rows, c_out * d_in}, input.options());
  const at::Tensor g = grad_output.reshape({rows, c_out, positions});
  const int64_t chunk =
      std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, d_in * positions));
  for (int64_t first = 0; first < n; first += chunk) {
    const int64_t count = std::min(chunk, n - first);
    const at::Tensor cols =
        at::im2col(input.narrow(0, first, count), kernel_size, dilation, padding, stride)
            .transpose(1, 2);  // [count, positions, d_in]
    for (int64_t p = 0; p < passes; ++p) {
      const int64_t row = p * n + first;
      u.narrow(0, row, count)
          .view({count, c_out, d_in})
          .copy_(at::bmm(g.narrow(0, row, count), cols));
    }
  }
  const at::Tensor gram = at::matmul(u, u.t());
  return bias ? add_bias_gram(gram, g.sum(2)) : gram;
}

at::Tensor conv2d_rows_mv(const at::Tensor& input, const at::Tensor& grad_output,
                          const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation) {
  checks::same_device_dtype(weight, input, "weight", "input");
  checks::dim_eq(weight, 4, "weight", "[C_out, C_in, kh, kw]");
  conv_rows(input, grad_output, weight.sizes().slice(2), stride, padding, dilation);
  TORCH_CHECK(weight.size(0) == grad_output.size(1) && weight.size(1) == input.size(1),
              "weight must have shape [", grad_output.size(1), ", ", input.size(1),
              ", kh, kw] (grad_output's and input's channels), got ", weight.sizes());
  c10::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) {
    checks::same_device_dtype(*bias, input, "bias", "input");
    checks::shape_eq(*bias, {weight.size(0)}, "bias", "[C_out]");
    b = *bias;
  }
  const at::Tensor y = at::conv2d(input, weight, b, stride, padding, dilation);  // no unfold
  return row_dots(grad_output, y, grad_output.size(0) / input.size(0));
}

std::tuple<at::Tensor, at::Tensor> conv2d_rows_tmv(const at::Tensor& input,
                                                   const at::Tensor& grad_output,
                                                   const at::Tensor& weights,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation) {
  conv_rows(input, grad_output, kernel_size, stride, padding, dilation);
  check_weights(weights, grad_output);
  const int64_t passes = grad_output.size(0) / input.size(0), c_out = grad_output.size(1);
  const at::Tensor gw = pass_sum(grad_output, weights, passes)
                            .view({input.size(0), c_out, grad_output.size(2), grad_output.size(3)});
  // The weight gradient of the convolution for the weighted output gradient (no unfold).
  const at::Tensor shape_only =
      at::zeros({c_out, input.size(1), kernel_size[0], kernel_size[1]}, input.options());
  const std::vector<int64_t> no_output_padding{0, 0};
  at::Tensor weight_part = std::get<1>(at::convolution_backward(
      gw, input, shape_only, c10::nullopt, stride, padding, dilation, /*transposed=*/false,
      no_output_padding, /*groups=*/1, {false, true, false}));
  return {weight_part, gw.sum({0, 2, 3})};
}

// ---- nn.Embedding -----------------------------------------------------------------------------

at::Tensor embedding_gram(const at::Tensor& indices, const at::Tensor& grad_output) {
  const EmbeddingRows E = embedding_rows(indices, grad_output);
  const int64_t rows = E.g.size(0), t = E.positions;
  // One-hot activations: a_rt . a_su = [idx_rt == idx_su].
  const at::Tensor idx = tiled(E.idx, E.passes).reshape({rows * t});
  return pairwise_gram(E.g, [&](int64_t first, int64_t count) {
    return idx.narrow(0, first * t, count * t)
        .unsqueeze(1)
        .eq(idx.unsqueeze(0))
        .to(E.g.scalar_type());
  });
}

at::Tensor embedding_rows_mv(const at::Tensor& indices, const at::Tensor& grad_output,
                             const at::Tensor& weight) {
  const EmbeddingRows E = embedding_rows(indices, grad_output);
  checks::same_device_dtype(weight, grad_output, "weight", "grad_output");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == E.g.size(2),
              "weight must have shape [num_embeddings, ", E.g.size(2), "], got ", weight.sizes());
  check_index_range(E.idx, weight.size(0));
  return row_dots(E.g, weight.index_select(0, E.idx.reshape({-1})), E.passes);
}

at::Tensor embedding_rows_tmv(const at::Tensor& indices, const at::Tensor& grad_output,
                              const at::Tensor& weights, int64_t num_embeddings) {
  const EmbeddingRows E = embedding_rows(indices, grad_output);
  check_weights(weights, grad_output);
  TORCH_CHECK(num_embeddings > 0, "num_embeddings must be > 0, got ", num_embeddings);
  check_index_range(E.idx, num_embeddings);
  const int64_t dim = E.g.size(2);
  const at::Tensor gw = pass_sum(E.g, weights, E.passes).reshape({E.samples * E.positions, dim});
  return at::zeros({num_embeddings, dim}, grad_output.options())
      .index_add_(0, E.idx.reshape({-1}), gw);
}

// ---- the small system -------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> gram_solve(const at::Tensor& gram, const at::Tensor& rhs,
                                              double shift) {
  checks::floating(gram, "gram");
  checks::dim_eq(gram, 2, "gram", "[R, R]");
  checks::square(gram, "gram");
  checks::nonempty_rows(gram.size(0), "gram");
  checks::same_device_dtype(rhs, gram, "rhs", "gram");
  TORCH_CHECK((rhs.dim() == 1 || rhs.dim() == 2) && rhs.size(0) == gram.size(0),
              "rhs must have shape [R] or [R, k] with R = ", gram.size(0), " (gram.size(0)), got ",
              rhs.sizes());
  TORCH_CHECK(std::isfinite(shift) && shift > 0.0,
              "shift must be a finite number > 0 (n * damping), got ", shift);
  checks::finite({{gram, "gram"}, {rhs, "rhs"}},
                 "the natural gradient is undefined; skip this step or find the non-finite "
                 "per-sample gradient");
  at::Tensor system = gram.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  system.diagonal().add_(shift);
  const at::Tensor b = (rhs.dim() == 1 ? rhs.unsqueeze(1) : rhs).to(at::kDouble);
  const SolveResult res = spd_solve(system, b);
  at::Tensor x = res.solution.to(rhs.scalar_type());
  return {(rhs.dim() == 1 ? x.squeeze(1) : x).contiguous(), rung_tensor(res.rung)};
}

// ATen compositions: registered for every device; Meta is served by the Python fake kernels
// (python/natgrad/ops/gram.py).
TORCH_LIBRARY_IMPL(natgrad, CompositeExplicitAutograd, m) {
  m.impl("linear_gram", &linear_gram);
  m.impl("linear_rows_mv", &linear_rows_mv);
  m.impl("linear_rows_tmv", &linear_rows_tmv);
  m.impl("conv2d_gram", &conv2d_gram);
  m.impl("conv2d_rows_mv", &conv2d_rows_mv);
  m.impl("conv2d_rows_tmv", &conv2d_rows_tmv);
  m.impl("embedding_gram", &embedding_gram);
  m.impl("embedding_rows_mv", &embedding_rows_mv);
  m.impl("embedding_rows_tmv", &embedding_rows_tmv);
  m.impl("gram_solve", &gram_solve);
}

}  // namespace natgrad
