#include "factors/ekfac_diagonal.h"

#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "common/checks.h"
#include "common/subnormal.h"
#include "factors/kron_factors.h"

namespace natgrad {
namespace {

constexpr int64_t kEkfacChunkElements = int64_t{1} << 22;

// diagonal [d_g, d_a] and the eigenvectors (a_eigenvectors undefined: V_A = I) share a floating
// dtype and the data's device.
void check_basis(const at::Tensor& diagonal, const at::Tensor& g_eigenvectors,
                 const at::Tensor* a_eigenvectors, const at::Tensor& data, const char* data_name,
                 int64_t d_g, int64_t d_a) {
  checks::floating(diagonal, "diagonal");
  TORCH_CHECK(diagonal.device() == data.device(), "diagonal must be on the same device as ",
              data_name, " (", data.device(), "), got ", diagonal.device());
  checks::shape_eq(diagonal, {d_g, d_a}, "diagonal",
                   "[out_features, in_features (+1 for bias)] matching the layer");
  checks::same_device_dtype(g_eigenvectors, diagonal, "g_eigenvectors", "diagonal");
  checks::shape_eq(g_eigenvectors, {d_g, d_g}, "g_eigenvectors", "[d_out, d_out]");
  if (a_eigenvectors != nullptr) {
    checks::same_device_dtype(*a_eigenvectors, diagonal, "a_eigenvectors", "diagonal");
    checks::shape_eq(*a_eigenvectors, {d_a, d_a}, "a_eigenvectors", "[d_in (+1), d_in (+1)]");
  }
}

// The number of gradient passes: grad_output's samples over the input's (a whole multiple).
int64_t passes_of(int64_t grad_samples, int64_t samples) {
  TORCH_CHECK(grad_samples >= samples && grad_samples % samples == 0,
              "grad_output must hold a whole number of passes over the input's ", samples,
              " samples along dim 0, got ", grad_samples);
  return grad_samples / samples;
}

// rows [..., d] rotated by V_A with an implicit ones column when bias: [rows, 1] V_A.
at::Tensor rotate_rows(const at::Tensor& rows, const at::Tensor& a_eigenvectors, bool bias) {
  const int64_t d = rows.size(-1);
  at::Tensor out = at::matmul(rows, a_eigenvectors.narrow(0, 0, d));
  if (bias) out.add_(a_eigenvectors.select(0, d));
  return out;
}

// S <- decay * S + (1 - decay) * scale * acc, unless acc is not finite (then S is kept).
at::Tensor apply_ema_(at::Tensor& diagonal, const at::Tensor& acc, double scale, double decay) {
  const at::Tensor ok = checks::finite_flag(acc);
  at::Tensor fresh = acc * ((1.0 - decay) * scale);
  if (decay != 0.0) fresh.add_(diagonal, decay);
  diagonal.copy_(at::where(ok, fresh, diagonal));
  flush_subnormal_(diagonal);
  return ok;
}

// acc += sum_{p, n} (g_pn^T x_n)^2 over chunks of samples, with x [N, R, d_a] and
// g [P, N, R, d_g] already rotated.
void add_per_sample_squares_(at::Tensor& acc, const at::Tensor& x, const at::Tensor& g) {
  const int64_t samples = x.size(0), passes = g.size(0);
  const int64_t chunk = ekfac_chunk_samples(passes, g.size(-1), x.size(-1), 0);
  for (int64_t first = 0; first < samples; first += chunk) {
    const int64_t count = std::min(chunk, samples - first);
    const at::Tensor m = at::matmul(g.narrow(1, first, count).transpose(-1, -2),
                                    x.narrow(0, first, count));  // [P, count, d_g, d_a]
    acc.add_(m.square().sum({0, 1}));
  }
}

}  // namespace

int64_t ekfac_chunk_samples(int64_t passes, int64_t d_g, int64_t d_a, int64_t per_sample_extra) {
  const int64_t budget = std::max(d_g * d_a, kEkfacChunkElements);
  const int64_t per_sample = std::max<int64_t>(1, passes * d_g * d_a + per_sample_extra);
  return std::max<int64_t>(1, budget / per_sample);
}

at::Tensor linear_ekfac_diagonal_ema_(at::Tensor& diagonal, const at::Tensor& input,
                                      const at::Tensor& grad_output,
                                      const at::Tensor& g_eigenvectors,
                                      const at::Tensor& a_eigenvectors, bool bias,
                                      double grad_scale, double decay) {
  checks::floating(input, "input");
  checks::floating(grad_output, "grad_output");
  checks::dim_ge(input, 2, "input", "[N, ..., in_features]");
  TORCH_CHECK(grad_output.dim() == input.dim(),
              "grad_output must have the input's dims ([P * N, ..., out_features]), got shapes ",
              grad_output.sizes(), " and ", input.sizes());
  TORCH_CHECK(
      grad_output.sizes().slice(1, input.dim() - 2) == input.sizes().slice(1, input.dim() - 2),
      "grad_output must have the input's positions (middle dims), got shapes ", grad_output.sizes(),
      " and ", input.sizes());
  checks::nonempty_rows(input.size(0), "input");
  checks::grad_scale(grad_scale);
  checks::decay(decay);
  const int64_t n = input.size(0), d_in = input.size(-1), d_g = grad_output.size(-1);
  const int64_t positions = c10::multiply_integers(input.sizes().slice(1, input.dim() - 2));
  const int64_t passes = passes_of(grad_output.size(0), n);
  check_basis(diagonal, g_eigenvectors, &a_eigenvectors, input, "input", d_g, d_in + bias);
  const auto dtype = diagonal.scalar_type();
  const at::Tensor x = rotate_rows(
      without_subnormals(input.reshape({n, positions, d_in}).to(dtype)), a_eigenvectors, bias);
  const at::Tensor g =
      at::matmul(without_subnormals(grad_output.reshape({passes, n, positions, d_g}).to(dtype)),
                 g_eigenvectors);  // [P, N, R, d_g]
  at::Tensor acc;
  if (positions == 1) {  // one GEMM: sum_p (G_p V_G)^2 against (X V_A)^2
    acc = at::matmul(g.square().sum(0).reshape({n, d_g}).t(), x.reshape({n, d_in + bias}).square());
  } else {
    acc = at::zeros({d_g, d_in + bias}, diagonal.options());
    add_per_sample_squares_(acc, x, g);
  }
  return apply_ema_(diagonal, acc, grad_scale * grad_scale / static_cast<double>(n), decay);
}

at::Tensor conv2d_ekfac_diagonal_ema_(at::Tensor& diagonal, const at::Tensor& input,
                                      const at::Tensor& grad_output,
                                      const at::Tensor& g_eigenvectors,
                                      const at::Tensor& a_eigenvectors, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, bool bias, double grad_scale,
                                      double decay) {
  const ConvGeometry geo = conv_geometry(input, kernel_size, stride, padding, dilation);
  checks::floating(grad_output, "grad_output");
  checks::dim_eq(grad_output, 4, "grad_output", "[P * N, C_out, OH, OW]");
  TORCH_CHECK(grad_output.size(2) * grad_output.size(3) == geo.positions,
              "grad_output must have the convolution's ", geo.positions,
              " output positions, got shape ", grad_output.sizes());
  checks::grad_scale(grad_scale);
  checks::decay(decay);
  const int64_t n = input.size(0), d_g = grad_output.size(1), d_a = geo.patch_dim + bias;
  const int64_t passes = passes_of(grad_output.size(0), n);
  check_basis(diagonal, g_eigenvectors, &a_eigenvectors, input, "input", d_g, d_a);
  const auto dtype = diagonal.scalar_type();
  const at::Tensor clean = without_subnormals(input);
  const at::Tensor g =
      at::matmul(without_subnormals(grad_output.reshape({passes, n, d_g, geo.positions}).to(dtype))
                     .transpose(-1, -2),
                 g_eigenvectors);  // [P, N, L, d_g]
  at::Tensor acc = at::zeros({d_g, d_a}, diagonal.options());
  const int64_t chunk =
      ekfac_chunk_samples(passes, d_g, d_a, (geo.patch_dim + d_a) * geo.positions);
  for (int64_t first = 0; first < n; first += chunk) {
    const int64_t count = std::min(chunk, n - first);
    const at::Tensor patches =
        at::im2col(clean.narrow(0, first, count), kernel_size, dilation, padding, stride)
            .to(dtype)
            .transpose(1, 2);  // [count, L, patch_dim]
    add_per_sample_squares_(acc, rotate_rows(patches, a_eigenvectors, bias),
                            g.narrow(1, first, count));
  }
  return apply_ema_(diagonal, acc, grad_scale * grad_scale / static_cast<double>(n), decay);
}

at::Tensor embedding_ekfac_diagonal_ema_(at::Tensor& diagonal, const at::Tensor& indices,
                                         const at::Tensor& grad_output,
                                         const at::Tensor& g_eigenvectors, double grad_scale,
                                         double decay) {
  TORCH_CHECK(indices.defined() &&
                  (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt),
              "indices must have an integer dtype (int64 or int32), got ",
              indices.defined() ? c10::toString(indices.scalar_type()) : "an undefined tensor");
  checks::dim_ge(indices, 1, "indices", "[N, ...]");
  checks::floating(grad_output, "grad_output");
  TORCH_CHECK(grad_output.dim() == indices.dim() + 1 &&
                  grad_output.sizes().slice(1, indices.dim() - 1) == indices.sizes().slice(1),
              "grad_output must be [P * N, ..., embedding_dim] over the indices' positions, got "
              "shapes ",
              grad_output.sizes(), " and ", indices.sizes());
  checks::nonempty_rows(indices.size(0), "indices");
  checks::grad_scale(grad_scale);
  checks::decay(decay);
  checks::dim_eq(diagonal, 2, "diagonal", "[embedding_dim, num_embeddings]");
  const int64_t n = indices.size(0), d_g = grad_output.size(-1), vocab = diagonal.size(1);
  const int64_t positions = indices.numel() / n;
  const int64_t passes = passes_of(grad_output.size(0), n);
  check_basis(diagonal, g_eigenvectors, nullptr, indices, "indices", d_g, vocab);
  const auto dtype = diagonal.scalar_type();
  const at::Tensor g =
      at::matmul(without_subnormals(grad_output.reshape({passes * n * positions, d_g}).to(dtype)),
                 g_eigenvectors);  // rotated rows, pass-major
  // One key per (pass, sample, index): a sample's rows that look up the same index sum into
  // one column of its gradient before squaring.
  const at::Tensor idx = indices.reshape({-1}).to(at::kLong).repeat({passes});
  const at::Tensor owner = at::arange(passes * n, idx.options()).repeat_interleave(positions);
  const auto unique = at::_unique2(owner.mul(vocab).add_(idx), /*sorted=*/false,
                                   /*return_inverse=*/true, /*return_counts=*/false);
  const at::Tensor& keys = std::get<0>(unique);
  const at::Tensor& inverse = std::get<1>(unique);
  const at::Tensor sums = at::zeros({keys.size(0), d_g}, g.options()).index_add_(0, inverse, g);
  at::Tensor acc = at::zeros({d_g, vocab}, diagonal.options());
  acc.index_add_(1, keys.remainder(vocab), sums.square().t());
  return apply_ema_(diagonal, acc, grad_scale * grad_scale / static_cast<double>(n), decay);
}

at::Tensor ekfac_rebase(const at::Tensor& eigenvalues, const at::Tensor& old_g_eigenvectors,
                        const at::Tensor& g_eigenvectors,
                        const std::optional<at::Tensor>& old_a_eigenvectors,
                        const std::optional<at::Tensor>& a_eigenvectors) {
  checks::floating(eigenvalues, "eigenvalues");
  checks::dim_eq(eigenvalues, 2, "eigenvalues", "[d_g, d_a]");
  const int64_t d_g = eigenvalues.size(0), d_a = eigenvalues.size(1);
  checks::same_device_dtype(old_g_eigenvectors, eigenvalues, "old_g_eigenvectors", "eigenvalues");
  checks::same_device_dtype(g_eigenvectors, eigenvalues, "g_eigenvectors", "eigenvalues");
  checks::shape_eq(old_g_eigenvectors, {d_g, d_g}, "old_g_eigenvectors", "[d_g, d_g]");
  checks::shape_eq(g_eigenvectors, {d_g, d_g}, "g_eigenvectors", "[d_g, d_g]");
  const bool old_a = old_a_eigenvectors.has_value() && old_a_eigenvectors->defined();
  const bool new_a = a_eigenvectors.has_value() && a_eigenvectors->defined();
  TORCH_CHECK(old_a == new_a,
              "old_a_eigenvectors and a_eigenvectors must both be given or both be None");
  at::Tensor out = at::matmul(at::matmul(g_eigenvectors.mT(), old_g_eigenvectors).square(),
                              eigenvalues.clamp_min(0));
  if (new_a) {
    for (const auto& [t, name] : {std::pair{*old_a_eigenvectors, "old_a_eigenvectors"},
                                  std::pair{*a_eigenvectors, "a_eigenvectors"}}) {
      checks::same_device_dtype(t, eigenvalues, name, "eigenvalues");
      checks::shape_eq(t, {d_a, d_a}, name, "[d_a, d_a]");
    }
    out = at::matmul(out, at::matmul(a_eigenvectors->mT(), *old_a_eigenvectors).square().t());
  }
  flush_subnormal_(out);
  return out;
}

// ATen compositions (matmul, im2col, index_add_): one registration serves every device. The
// Meta key is served by the Python fake kernels (python/natgrad/ops/ekfac.py).
TORCH_LIBRARY_IMPL(natgrad, CompositeExplicitAutograd, m) {
  m.impl("linear_ekfac_diagonal_ema_", &linear_ekfac_diagonal_ema_);
  m.impl("conv2d_ekfac_diagonal_ema_", &conv2d_ekfac_diagonal_ema_);
  m.impl("embedding_ekfac_diagonal_ema_", &embedding_ekfac_diagonal_ema_);
  m.impl("ekfac_rebase", &ekfac_rebase);
}

}  // namespace natgrad
