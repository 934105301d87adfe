// The K-FAC rules both frontends share (csrc/kfac/kfac_rules.h), against closed forms.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kfac/kfac_rules.h"

namespace kfac = natgrad::kfac;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

}  // namespace

TEST(KfacRules, StatisticsLimitIsAQuarterOfTheLargestFactorValue) {
  EXPECT_EQ(kfac::statistics_limit(torch::kDouble), std::numeric_limits<double>::max() / 4);
  EXPECT_EQ(kfac::statistics_limit(torch::kFloat),
            static_cast<double>(std::numeric_limits<float>::max()) / 4);
  EXPECT_EQ(kfac::statistics_limit(torch::kHalf), 65504.0 / 4);
  EXPECT_EQ(kfac::statistics_limit(torch::kBFloat16), 3.3895313892515355e38 / 4);
  EXPECT_THROW(kfac::statistics_limit(torch::kLong), c10::Error);
}

TEST(KfacRules, BoundRejectsNaNInfAndPeaksWhoseGramSumCouldOverflow) {
  const double limit = kfac::statistics_limit(torch::kFloat);
  EXPECT_TRUE(kfac::within_bound(1.0, 10.0, torch::kFloat));
  EXPECT_FALSE(kfac::within_bound(kNaN, 1.0, torch::kFloat));
  EXPECT_FALSE(kfac::within_bound(kInf, 1.0, torch::kDouble));
  const double edge = std::sqrt(limit / 100.0);
  EXPECT_TRUE(kfac::within_bound(edge * 0.99, 100.0, torch::kFloat));
  EXPECT_FALSE(kfac::within_bound(edge * 1.01, 100.0, torch::kFloat));
  EXPECT_EQ(kfac::grad_count(0, 0.5), 1.0);  // rows and scale each count at least 1
  EXPECT_EQ(kfac::grad_count(8, 3.0), 8 * 9.0);
}

TEST(KfacRules, StatisticsOkBoundsGradientsAndFloatingInputsOnly) {
  auto x = torch::ones({4, 3}, torch::kFloat);
  auto g = torch::ones({4, 2}, torch::kFloat);
  EXPECT_TRUE(kfac::statistics_ok(x, g, 4, 4, 2.0, torch::kFloat).item<bool>());
  auto big = torch::full({4, 2}, 1e19, torch::kFloat);  // 1e38 * 4 rows * 2^2 > 3.4e38 / 4
  EXPECT_FALSE(kfac::statistics_ok(x, big, 4, 4, 2.0, torch::kFloat).item<bool>());
  EXPECT_TRUE(kfac::statistics_ok(x, big, 4, 4, 2.0, torch::kDouble).item<bool>());
  auto bad_x = x.clone();
  bad_x[1][2] = std::nanf("");
  EXPECT_FALSE(kfac::statistics_ok(bad_x, g, 4, 4, 1.0, torch::kFloat).item<bool>());
  auto indices = torch::tensor({1, 2, 3}, torch::kLong);  // an Embedding's: not bounded
  EXPECT_TRUE(kfac::statistics_ok(indices, g, 3, 4, 1.0, torch::kFloat).item<bool>());
  const auto ok = kfac::statistics_ok(x, g, 4, 4, 1.0, torch::kFloat);
  EXPECT_EQ(ok.dim(), 0);
  EXPECT_EQ(ok.scalar_type(), torch::kBool);
}

TEST(KfacRules, MaxAbsIsTheLargestMagnitudeOrZeroWhenEmpty) {
  EXPECT_EQ(kfac::max_abs(torch::tensor({-3.0, 2.0})).item<double>(), 3.0);
  EXPECT_EQ(kfac::max_abs(torch::empty({0})).item<double>(), 0.0);
  EXPECT_TRUE(std::isnan(kfac::max_abs(torch::tensor({1.0, kNaN})).item<double>()));
}

TEST(KfacRules, LinearAndEmbeddingRowsCountEveryPosition) {
  EXPECT_EQ(kfac::linear_rows({5, 7, 3}, 3), 35);
  EXPECT_EQ(kfac::linear_rows({3}, 3), 1);
  EXPECT_EQ(kfac::linear_rows({4, 0}, 0), 0);
  EXPECT_EQ(kfac::embedding_rows({2, 6}), 12);
  EXPECT_EQ(kfac::embedding_rows({}), 1);
}

TEST(KfacRules, ConvRowsAreSamplesTimesTorchsOutputPositions) {
  // 2 x 8 x 9 input, kernel 3, stride 2, padding 1, dilation 1: out = floor((n + 2 - 3) / 2) + 1.
  EXPECT_EQ(kfac::conv_rows({2, 3, 8, 9}, {3, 3}, {2, 2}, {1, 1}, {1, 1}), 2 * 4 * 5);
  EXPECT_EQ(kfac::conv_rows({2, 3, 8, 9}, {3, 2}, {1, 1}, {0, 0}, {2, 1}), 2 * 4 * 8);
  EXPECT_EQ(kfac::conv_rows({3, 8, 9}, {3, 3}, {1, 1}, {0, 0}, {1, 1}), 1);  // unbatched
  EXPECT_EQ(kfac::conv_rows({4, 2, 10}, {3}, {1}, {0}, {1}), 4 * 8);         // 1-d
  // An input smaller than the kernel: floor division, as Python's (truncation would give 0).
  EXPECT_EQ(kfac::conv_rows({2, 1, 1}, {4}, {2}, {0}, {1}), 2 * -1);
  EXPECT_THROW(kfac::conv_rows({1, 1, 4, 4}, {3, 3}, {1}, {0, 0}, {1, 1}), c10::Error);
}

TEST(KfacRules, SampleScaleFollowsTheLossReduction) {
  EXPECT_EQ(kfac::sample_scale(32, 320, "sum"), 1.0);
  EXPECT_EQ(kfac::sample_scale(32, 320, "mean"), 32.0);
  EXPECT_EQ(kfac::sample_scale(32, 320, "token_mean"), std::sqrt(32.0 * 320.0));
  EXPECT_EQ(kfac::sample_scale(0, 0, "token_mean"), 0.0);
  EXPECT_THROW(kfac::sample_scale(1, 1, "max"), c10::Error);
}

TEST(KfacRules, SampleScaleOfACallSharedByTheBatchIsThatOfTheBatchOverItsRoot) {
  // One sample's input (position ids [1, T]) in a batch of 16: the gradient sums 16 samples'.
  EXPECT_DOUBLE_EQ(kfac::sample_scale(1, 64, "mean", 16), 16.0 / 4.0);
  EXPECT_DOUBLE_EQ(kfac::sample_scale(1, 64, "sum", 16), 1.0 / 4.0);
  EXPECT_DOUBLE_EQ(kfac::sample_scale(1, 64, "token_mean", 16), std::sqrt(16.0 * 64.0 * 16.0) / 4.0);
  // A batch of one, or a call that sees the batch itself, is unchanged.
  EXPECT_EQ(kfac::sample_scale(1, 64, "mean", 1), 1.0);
  EXPECT_EQ(kfac::sample_scale(16, 64, "mean", 16), 16.0);
  EXPECT_THROW(kfac::sample_scale(1, 1, "mean", -1), c10::Error);
}

TEST(KfacRules, ExpandScaleCountsEveryPositionAndPassAsASample) {
  // 4 samples of 6 tokens, one backward pass: sqrt(6).
  EXPECT_EQ(kfac::expand_grad_scale(2.0, 4, 24, 24), 2.0 * std::sqrt(6.0));
  // Two backward passes per forward row (e.g. a sampled-label pass and the data pass).
  EXPECT_EQ(kfac::expand_grad_scale(2.0, 4, 24, 48), 2.0 * std::sqrt(12.0));
  // One row per sample and one pass: the scale is unchanged.
  EXPECT_EQ(kfac::expand_grad_scale(3.0, 5, 5, 5), 3.0);
  // Empty captures count as one position and one pass.
  EXPECT_EQ(kfac::expand_grad_scale(3.0, 0, 0, 0), 3.0);
  EXPECT_THROW(kfac::expand_grad_scale(1.0, -1, 1, 1), c10::Error);
}

TEST(KfacRules, PiCorrectionDefaultsToOnForInversesOnly) {
  EXPECT_TRUE(kfac::pi_correction_enabled("inverse", std::nullopt));
  EXPECT_FALSE(kfac::pi_correction_enabled("eigen", std::nullopt));
  EXPECT_TRUE(kfac::pi_correction_enabled("eigen", true));
  EXPECT_FALSE(kfac::pi_correction_enabled("inverse", false));
  EXPECT_THROW(kfac::pi_correction_enabled("cholesky", std::nullopt), c10::Error);
}

TEST(KfacRules, DampingIsTheGroupsTimesTheMultiplier) {
  EXPECT_EQ(kfac::resolved_damping(1e-3, 1.0), 1e-3);
  EXPECT_EQ(kfac::resolved_damping(1e-3, 4.0), 4e-3);
  EXPECT_THROW(kfac::resolved_damping(0.0, 1.0), c10::Error);
  EXPECT_THROW(kfac::resolved_damping(1e-3, kNaN), c10::Error);
}

TEST(KfacRules, DampingAdaptationFollowsTheReductionRatio) {
  const double omega = std::pow(0.95, 5);
  auto good = kfac::adapt_damping(1.0, -0.9, -1.0, 0.95, 5);  // rho 0.9 > 3/4: less damping
  EXPECT_EQ(good.ratio, 0.9);
  EXPECT_EQ(good.multiplier, omega);
  auto poor = kfac::adapt_damping(1.0, -0.1, -1.0, 0.95, 5);  // rho 0.1 < 1/4: more damping
  EXPECT_EQ(poor.multiplier, 1.0 / omega);
  auto fair = kfac::adapt_damping(2.0, -0.5, -1.0, 0.95, 5);
  EXPECT_EQ(fair.multiplier, 2.0);
  auto none = kfac::adapt_damping(1.0, -0.5, 0.0, 0.95, 5);  // no predicted decrease
  EXPECT_EQ(none.ratio, -kInf);
  EXPECT_EQ(none.multiplier, 1.0 / omega);
  EXPECT_EQ(kfac::adapt_damping(1e8, 1.0, -1.0, 0.5, 1).multiplier, 1e8);  // clamped
  EXPECT_EQ(kfac::adapt_damping(1e-8, -1.0, -1.0, 0.5, 1).multiplier, 1e-8);
}

TEST(KfacRules, QuadraticStepSolvesTheTwoByTwoModel) {
  // A = [[4, 1], [1, 2]], b = [-2, 1]: w = -A^{-1} b = (5/7, -6/7), M = b.w / 2 = -8/7.
  auto q = kfac::quadratic_step(4.0, 1.0, 2.0, -2.0, 1.0, true, 0.9);
  ASSERT_TRUE(q.finite);
  EXPECT_NEAR(q.alpha, 5.0 / 7.0, 1e-15);
  EXPECT_NEAR(q.mu, -6.0 / 7.0, 1e-15);
  EXPECT_NEAR(q.model_change, -8.0 / 7.0, 1e-15);
  // fixed momentum: alpha = -(b0 + mu a01) / a00
  auto fixed = kfac::quadratic_step(4.0, 1.0, 2.0, -2.0, 1.0, false, 0.5);
  EXPECT_EQ(fixed.mu, 0.5);
  EXPECT_NEAR(fixed.alpha, 1.5 / 4.0, 1e-15);
  EXPECT_NEAR(fixed.model_change, 0.5 * (0.140625 * 4 + 2 * 0.375 * 0.5 + 0.25 * 2) - 0.75 + 0.5,
              1e-15);
}

TEST(KfacRules, QuadraticStepFallsBackOnDegenerateModels) {
  auto first = kfac::quadratic_step(4.0, 0.0, 0.0, -2.0, 0.0, true, 0.9);  // no previous update
  EXPECT_EQ(first.alpha, 0.5);
  EXPECT_EQ(first.mu, 0.0);
  auto parallel = kfac::quadratic_step(1.0, 2.0, 4.0, -1.0, -2.0, true, 0.9);  // delta = 2 Delta
  EXPECT_EQ(parallel.alpha, 1.0);
  EXPECT_EQ(parallel.mu, 0.0);
  auto no_proposal = kfac::quadratic_step(0.0, 0.0, 2.0, 0.0, -1.0, true, 0.9);
  EXPECT_EQ(no_proposal.alpha, 0.0);
  EXPECT_EQ(no_proposal.mu, 0.5);
  auto nothing = kfac::quadratic_step(0.0, 0.0, 0.0, 0.0, 0.0, true, 0.9);
  EXPECT_TRUE(nothing.finite);
  EXPECT_EQ(nothing.alpha, 0.0);
  EXPECT_EQ(nothing.model_change, 0.0);
  for (double bad : {kNaN, kInf}) {
    auto q = kfac::quadratic_step(bad, 0.0, 1.0, -1.0, 0.0, true, 0.9);
    EXPECT_FALSE(q.finite);
    EXPECT_EQ(q.alpha, 0.0);
    EXPECT_EQ(q.mu, 0.0);
  }
  EXPECT_FALSE(kfac::quadratic_step(1e-300, 0.0, 0.0, -1e300, 0.0, false, 0.0).finite);  // overflow
}

TEST(KfacRules, FsumIsCorrectlyRounded) {
  EXPECT_EQ(kfac::fsum({1e100, 1.0, -1e100}), 1.0);
  EXPECT_EQ(kfac::fsum({0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1}), 1.0);
  EXPECT_EQ(kfac::fsum({}), 0.0);
  // Half-way case: 1 + 2^-53 + 2^-106 rounds up only when the last partial is counted.
  EXPECT_EQ(kfac::fsum({1.0, std::ldexp(1.0, -53), std::ldexp(1.0, -106)}),
            1.0 + std::ldexp(1.0, -52));
  EXPECT_TRUE(std::isinf(kfac::fsum({1.0, kInf})));
}

TEST(KfacRules, TrustRegionWithoutMomentumScalesToTheKlClip) {
  // sum lr^2 <u, g> = 0.01 * 2 + 0.04 * 3 = 0.14 > kl_clip 1e-3: nu = sqrt(1e-3 / 0.14).
  auto t = kfac::trust_region(1e-3, {2.0, 3.0}, {0.0, 0.0}, {0.1, 0.2}, {0.0, 0.0}, {0.0, 0.0});
  EXPECT_DOUBLE_EQ(t.nu, std::sqrt(1e-3 / 0.14));
  auto small = kfac::trust_region(1.0, {2.0, 3.0}, {0.0, 0.0}, {0.1, 0.2}, {0.0, 0.0}, {0.0, 0.0});
  EXPECT_EQ(small.nu, 1.0);
  auto negative = kfac::trust_region(1e-3, {-2.0}, {0.0}, {0.1}, {0.0}, {0.0});
  EXPECT_EQ(negative.nu, 1.0);
  auto nan = kfac::trust_region(1e-3, {kNaN}, {0.0}, {0.1}, {0.0}, {0.0});
  EXPECT_EQ(nan.nu, 1.0);
}

TEST(KfacRules, TrustRegionCountsMomentumAndCarriesEachShare) {
  // term = <u, g> + 2 mu <b, g> + mu^2 s = 1 + 2 * 0.5 * 2 + 0.25 * 4 = 4; lr^2 = 1.
  auto t = kfac::trust_region(1.0, {1.0}, {2.0}, {1.0}, {0.5}, {4.0});
  EXPECT_EQ(t.nu, 0.5);  // sqrt(1 / 4)
  ASSERT_EQ(t.kl_share.size(), 1u);
  EXPECT_EQ(t.kl_share[0], 1.0);  // 4 * nu^2
  EXPECT_THROW(kfac::trust_region(1.0, {1.0}, {}, {1.0}, {0.5}, {4.0}), c10::Error);
  EXPECT_THROW(kfac::trust_region(0.0, {1.0}, {0.0}, {1.0}, {0.5}, {4.0}), c10::Error);
}

TEST(KfacRules, FaultFlagsClassifyGradientsBeforeDirections) {
  EXPECT_EQ(kfac::direction_fault(1.0, 1.0), kfac::Fault::kNone);
  EXPECT_EQ(kfac::direction_fault(0.0, 0.0), kfac::Fault::kGradients);
  EXPECT_EQ(kfac::direction_fault(1.0, 0.0), kfac::Fault::kDirections);
  EXPECT_EQ(kfac::factor_fault(0.0, 1.0), kfac::Fault::kStatistics);
  EXPECT_EQ(kfac::factor_fault(1.0, 0.0), kfac::Fault::kFactors);
  EXPECT_EQ(kfac::factor_fault(1.0, 1.0), kfac::Fault::kNone);
  const std::vector<double> rows{1, 1, 0.5, 0.2, 0, 1, 0.1, 1, 0, 3};
  EXPECT_EQ(kfac::direction_faults(rows, {0, 4, 7}), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(kfac::factor_faults({1, 1, 0, 1, 1, 0}), (std::vector<int64_t>{0, 3, 4}));
  EXPECT_THROW(kfac::direction_faults(rows, {9}), c10::Error);
  EXPECT_THROW(kfac::factor_faults({1, 1, 0}), c10::Error);
}

TEST(KfacRules, FaultMessageNamesWhatAndWhere) {
  EXPECT_EQ(kfac::fault_message("natgrad.KFAC", kfac::Fault::kGradients, "parameter", "fc.bias"),
            "natgrad.KFAC: NaN or Inf (or values that would overflow) in the gradients of "
            "parameter 'fc.bias'; its update is skipped this step (parameters and factors "
            "untouched)");
  EXPECT_NE(kfac::fault_message("x", kfac::Fault::kFactors, "layer", "a")
                .find("updated factors (reset) of layer 'a'"),
            std::string::npos);
  EXPECT_NE(kfac::fault_message("x", kfac::Fault::kStatistics, "layer", "it's").find("\"it's\""),
            std::string::npos);
  EXPECT_THROW(kfac::fault_message("x", kfac::Fault::kNone, "layer", "a"), c10::Error);
}

TEST(KfacRules, UnsupportedReasonsNameTheOffendingOption) {
  EXPECT_EQ(kfac::conv_unsupported_reason(1, "(1, 1)", "zeros"), "");
  EXPECT_EQ(kfac::conv_unsupported_reason(2, "(0, 0)", "zeros"), "grouped convolution (groups=2)");
  EXPECT_EQ(kfac::conv_unsupported_reason(1, "'same'", "zeros"),
            "padding='same', padding_mode='zeros'");
  EXPECT_EQ(kfac::conv_unsupported_reason(1, "(1, 1)", "reflect"),
            "padding=(1, 1), padding_mode='reflect'");
  EXPECT_EQ(kfac::embedding_unsupported_reason(false, false), "");
  EXPECT_EQ(kfac::embedding_unsupported_reason(true, true), "sparse gradients");
  EXPECT_EQ(kfac::embedding_unsupported_reason(false, true),
            "max_norm renormalises weights in forward");
}
