// kfac_factors_ema_ (factors/kron_factors.h): every Linear/Conv2d layer's factor EMAs of one
// K-FAC step in one call, against the per-layer EMA ops and float64 reference formulas; its
// per-layer fault flags and argument checks.
#include <limits>
#include <vector>

#include "factor_reference.h"
#include "natgrad.h"
#include "test_helpers.h"

namespace {

using natgrad_test::AllClose;
using natgrad_test::conv_cases;
using natgrad_test::ConvCase;
using natgrad_test::kTol64;
using natgrad_test::ref_linear_act;
using natgrad_test::ref_linear_grad;
using natgrad_test::ThrowsMentioning;

TEST(KfacFactorsEma, EqualsThePerLayerEmaOpsAndFlagsABadLayer) {
  at::manual_seed(23);
  const ConvCase cc = conv_cases()[0];
  const at::Tensor x0 = at::randn({6, 4}, at::kDouble), g0 = at::randn({6, 3}, at::kDouble);
  const at::Tensor img = at::randn({cc.n, cc.c, cc.h, cc.w}, at::kDouble);
  const at::Tensor a1_ref =
      natgrad::conv2d_act_factor(img, cc.kernel, cc.stride, cc.padding, cc.dilation, true);
  const int64_t c_out = 3;
  const int64_t oh =
      natgrad_test::conv_out(cc.h, cc.kernel[0], cc.stride[0], cc.padding[0], cc.dilation[0]);
  const int64_t ow =
      natgrad_test::conv_out(cc.w, cc.kernel[1], cc.stride[1], cc.padding[1], cc.dilation[1]);
  const at::Tensor g_img = at::randn({cc.n, c_out, oh, ow}, at::kDouble);
  at::Tensor a0 = at::eye(5, at::kDouble), g0f = at::eye(3, at::kDouble);
  at::Tensor a1 = at::eye(a1_ref.size(0), at::kDouble), g1f = at::eye(c_out, at::kDouble);
  std::vector<int64_t> layouts{1,
                               0,
                               0,
                               0,
                               0,
                               0,
                               0,
                               0,
                               0,
                               1,
                               cc.kernel[0],
                               cc.kernel[1],
                               cc.stride[0],
                               cc.stride[1],
                               cc.padding[0],
                               cc.padding[1],
                               cc.dilation[0],
                               cc.dilation[1]};
  const at::Tensor flags = natgrad::kfac_factors_ema_({a0, a1}, {g0f, g1f}, {x0, img}, {g0, g_img},
                                                      layouts, {2.0, 1.5}, {0.5, 0.0});
  EXPECT_TRUE(at::equal(flags, at::ones({2, 2}, at::kDouble)));
  EXPECT_TRUE(AllClose(a0, at::eye(5, at::kDouble) * 0.5 + ref_linear_act(x0, true) * 0.5, kTol64));
  EXPECT_TRUE(
      AllClose(g0f, at::eye(3, at::kDouble) * 0.5 + ref_linear_grad(g0, 2.0) * 0.5, kTol64));
  EXPECT_TRUE(AllClose(a1, a1_ref, kTol64));
  EXPECT_TRUE(AllClose(g1f, natgrad::conv2d_grad_factor(g_img, 1.5), kTol64));
  // A NaN gradient: that layer is left untouched and flagged; the healthy layer, fed a new batch,
  // is updated to the reference EMA (not merely "changed", which rounding alone could decide).
  at::Tensor bad = g0.clone();
  bad[1][2] = std::numeric_limits<double>::quiet_NaN();
  const at::Tensor img2 = at::randn_like(img), g_img2 = at::randn_like(g_img);
  const at::Tensor a0_before = a0.clone(), g0_before = g0f.clone();
  const at::Tensor a1_before = a1.clone(), g1_before = g1f.clone();
  const at::Tensor flags2 = natgrad::kfac_factors_ema_(
      {a0, a1}, {g0f, g1f}, {x0, img2}, {bad, g_img2}, layouts, {2.0, 1.5}, {0.5, 0.5});
  EXPECT_EQ(flags2[0][0].item<double>(), 0.0);
  EXPECT_EQ(flags2[0][1].item<double>(), 1.0);
  EXPECT_EQ(flags2[1][0].item<double>(), 1.0);
  EXPECT_EQ(flags2[1][1].item<double>(), 1.0);
  EXPECT_TRUE(at::equal(a0, a0_before) && at::equal(g0f, g0_before));
  const at::Tensor a1_new =
      natgrad::conv2d_act_factor(img2, cc.kernel, cc.stride, cc.padding, cc.dilation, true);
  EXPECT_TRUE(AllClose(a1, a1_before * 0.5 + a1_new * 0.5, kTol64));
  EXPECT_TRUE(
      AllClose(g1f, g1_before * 0.5 + natgrad::conv2d_grad_factor(g_img2, 1.5) * 0.5, kTol64));
  EXPECT_FALSE(AllClose(a1_new, a1_before, 1e-3));  // the new batch's statistic really differs
}

TEST(KfacFactorsEma, OverflowingStatisticsAreSkippedAndArgumentsCheckedFirst) {
  at::Tensor a = at::eye(3, at::kFloat), g = at::eye(2, at::kFloat);
  at::Tensor x = at::ones({4, 2}, at::kFloat);
  x[0][0] = 1e19f;  // finite, but 1e38 * 4 rows overflows a float32 Gram sum
  const std::vector<int64_t> linear{1, 0, 0, 0, 0, 0, 0, 0, 0};
  const at::Tensor flags =
      natgrad::kfac_factors_ema_({a}, {g}, {x}, {at::ones({4, 2})}, linear, {1.0}, {0.9});
  EXPECT_EQ(flags[0][0].item<double>(), 0.0);
  EXPECT_TRUE(at::equal(a, at::eye(3, at::kFloat)) && at::equal(g, at::eye(2, at::kFloat)));
  const at::Tensor ok = at::ones({4, 2});
  at::Tensor a2 = at::eye(3, at::kFloat);
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::kfac_factors_ema_({a2, a}, {g, at::eye(3, at::kFloat)}, {ok, ok}, {ok, ok},
                                   {1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0},
                                   {1.0, 1.0}, {0.5, 0.5});
      },
      {"g_factors[1]", "shape"}));
  EXPECT_TRUE(at::equal(a2, at::eye(3, at::kFloat)));  // layer 0 was not updated either
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::kfac_factors_ema_({a}, {g}, {ok}, {ok}, {1, 0}, {1.0}, {0.5});
      },
      {"layouts", "9 integers per layer"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::kfac_factors_ema_({a}, {g}, {ok}, {ok}, linear, {1.0}, {0.5, 0.5});
      },
      {"decays", "one entry per layer"}));
}

}  // namespace
