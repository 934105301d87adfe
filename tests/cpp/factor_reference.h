// Float64 reference formulas for the Kronecker factors, written in plain ATen and explicit loops
// (never calling natgrad): the conventions of csrc/factors/kron_factors.h spelled out directly.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

#include "test_helpers.h"

namespace natgrad_test {

inline at::Tensor ref_linear_act(const at::Tensor& input, bool bias) {
  at::Tensor rows = input.to(at::kDouble).reshape({-1, input.size(-1)});
  if (bias) rows = with_ones_column(rows);
  return mean_gram(rows);
}

inline at::Tensor ref_linear_grad(const at::Tensor& grad_output, double grad_scale) {
  const at::Tensor rows = grad_output.to(at::kDouble).reshape({-1, grad_output.size(-1)});
  return mean_gram(rows) * (grad_scale * grad_scale);
}

struct ConvCase {
  int64_t n, c, h, w;
  std::array<int64_t, 2> kernel, stride, padding, dilation;
};

inline int64_t conv_out(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (size + 2 * p - d * (k - 1) - 1) / s + 1;
}

// Patch rows [N * OH * OW, C * kh * kw] in (c, i, j) column order, by explicit loops.
inline at::Tensor ref_patches(const at::Tensor& input, const ConvCase& cc) {
  const at::Tensor x = input.to(at::kDouble).contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto [kh, kw] = cc.kernel;
  const int64_t oh_n = conv_out(H, kh, cc.stride[0], cc.padding[0], cc.dilation[0]);
  const int64_t ow_n = conv_out(W, kw, cc.stride[1], cc.padding[1], cc.dilation[1]);
  at::Tensor out = at::zeros({N * oh_n * ow_n, C * kh * kw}, at::kDouble);
  auto xa = x.accessor<double, 4>();
  auto oa = out.accessor<double, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oh = 0; oh < oh_n; ++oh)
      for (int64_t ow = 0; ow < ow_n; ++ow)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < kh; ++i)
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t h = oh * cc.stride[0] - cc.padding[0] + i * cc.dilation[0];
              const int64_t w = ow * cc.stride[1] - cc.padding[1] + j * cc.dilation[1];
              if (h >= 0 && h < H && w >= 0 && w < W) {
                oa[(n * oh_n + oh) * ow_n + ow][(c * kh + i) * kw + j] = xa[n][c][h][w];
              }
            }
  return out;
}

inline at::Tensor ref_conv_act(const at::Tensor& input, const ConvCase& cc, bool bias) {
  at::Tensor rows = ref_patches(input, cc);
  if (bias) rows = with_ones_column(rows);
  return mean_gram(rows);
}

inline at::Tensor ref_conv_grad(const at::Tensor& grad_output, double grad_scale) {
  const at::Tensor rows =
      grad_output.to(at::kDouble).permute({0, 2, 3, 1}).reshape({-1, grad_output.size(1)});
  return mean_gram(rows) * (grad_scale * grad_scale);
}

// Conv2d geometries covering batch 1, stride, padding, dilation and non-square kernels.
inline const std::vector<ConvCase>& conv_cases() {
  static const std::vector<ConvCase> cases = {
      {3, 2, 6, 7, {3, 3}, {1, 1}, {0, 0}, {1, 1}},  // plain
      {1, 3, 5, 5, {3, 3}, {1, 1}, {1, 1}, {1, 1}},  // batch 1, "same" padding
      {2, 2, 9, 8, {3, 2}, {2, 3}, {1, 0}, {1, 1}},  // non-square kernel and stride
      {2, 3, 9, 9, {3, 3}, {1, 2}, {2, 1}, {2, 3}},  // dilation with padding
      {4, 1, 4, 4, {1, 1}, {1, 1}, {0, 0}, {1, 1}},  // 1x1 kernel
  };
  return cases;
}

}  // namespace natgrad_test
