// Kronecker factors (factors/kron_factors.h) against float64 reference formulas, the K-FAC
// theory check for one sample, and calls through the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "factor_reference.h"
#include "natgrad.h"
#include "test_helpers.h"

namespace {

using natgrad_test::AllClose;
using natgrad_test::conv_cases;
using natgrad_test::ConvCase;
using natgrad_test::kTol32;
using natgrad_test::kTol64;
using natgrad_test::ref_conv_act;
using natgrad_test::ref_conv_grad;
using natgrad_test::ref_linear_act;
using natgrad_test::ref_linear_grad;
using natgrad_test::ref_patches;
using natgrad_test::ThrowsMentioning;
using natgrad_test::tol_for;

at::Tensor conv_act(const at::Tensor& input, const ConvCase& cc, bool bias) {
  return natgrad::conv2d_act_factor(input, cc.kernel, cc.stride, cc.padding, cc.dilation, bias);
}

// ---- Linear activation factor ---------------------------------------------------------------

TEST(KronFactors, LinearWithBiasMatchesReference) {
  at::manual_seed(0);
  for (auto [n, d] : std::vector<std::pair<int64_t, int64_t>>{{1, 4}, {7, 5}, {64, 12}}) {
    const at::Tensor x = at::randn({n, d}, at::kDouble);
    EXPECT_TRUE(AllClose(natgrad::linear_act_factor(x, true), ref_linear_act(x, true), kTol64))
        << "n=" << n << " d=" << d;
  }
}

TEST(KronFactors, LinearWithoutBiasMatchesReferenceInBothDtypes) {
  at::manual_seed(1);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const at::Tensor x = at::randn({9, 6}, dtype);
    const at::Tensor a = natgrad::linear_act_factor(x, false);
    EXPECT_EQ(a.scalar_type(), dtype);
    EXPECT_TRUE(AllClose(a, ref_linear_act(x, false), tol_for(dtype)));
  }
}

TEST(KronFactors, LinearFlattensAllLeadingDimensions) {
  at::manual_seed(2);
  for (auto shape : std::vector<std::vector<int64_t>>{{4, 6, 5}, {2, 3, 4, 5}, {5}}) {
    const at::Tensor x = at::randn(shape, at::kDouble);
    for (bool bias : {false, true}) {
      EXPECT_TRUE(AllClose(natgrad::linear_act_factor(x, bias), ref_linear_act(x, bias), kTol64))
          << "shape " << x.sizes() << " bias " << bias;
    }
  }
}

TEST(KronFactors, LinearAcceptsNonContiguousViews) {
  at::manual_seed(3);
  const at::Tensor transposed = at::randn({6, 10}, at::kDouble).t();              // [10, 6]
  const at::Tensor strided = at::randn({8, 14}, at::kDouble).slice(1, 0, 14, 2);  // [8, 7]
  const at::Tensor batched = at::randn({5, 3, 4}, at::kDouble).transpose(0, 1);   // [3, 5, 4]
  for (const at::Tensor& x : {transposed, strided, batched}) {
    ASSERT_FALSE(x.is_contiguous());
    EXPECT_TRUE(AllClose(natgrad::linear_act_factor(x, true), ref_linear_act(x, true), kTol64));
  }
}

TEST(KronFactors, LinearFactorIsRankDeficientWhenBatchIsSmallerThanDimension) {
  at::manual_seed(4);
  const at::Tensor x = at::randn({3, 10}, at::kDouble);
  for (bool bias : {false, true}) {
    const at::Tensor a = natgrad::linear_act_factor(x, bias);
    EXPECT_TRUE(AllClose(a, ref_linear_act(x, bias), kTol64));
    const at::Tensor evals = at::linalg_eigvalsh(a);
    EXPECT_EQ((evals > 1e-9).sum().item<int64_t>(), 3);  // rank = batch size
    EXPECT_GE(evals.min().item<double>(), -1e-12);
  }
}

TEST(KronFactors, LinearBatchOfOneIsTheOuterProductOfTheAugmentedInput) {
  const at::Tensor x = at::tensor({1.5, -2.0, 0.25}, at::kDouble).unsqueeze(0);
  const at::Tensor a_tilde = at::tensor({1.5, -2.0, 0.25, 1.0}, at::kDouble);
  EXPECT_TRUE(AllClose(natgrad::linear_act_factor(x, true), at::outer(a_tilde, a_tilde), kTol64));
}

TEST(KronFactors, LinearEmaBlendsOldAndNewInPlace) {
  at::manual_seed(5);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    for (bool bias : {false, true}) {
      const at::Tensor x = at::randn({2, 7, 5}, dtype);
      const int64_t dim = 5 + (bias ? 1 : 0);
      at::Tensor factor = natgrad_test::random_spd(dim).to(dtype);
      const at::Tensor old = factor.clone();
      const void* storage = factor.data_ptr();
      natgrad::linear_act_factor_ema_(factor, x, bias, 0.9);
      EXPECT_EQ(factor.data_ptr(), storage);
      EXPECT_TRUE(AllClose(factor, old.to(at::kDouble) * 0.9 + ref_linear_act(x, bias) * 0.1,
                           tol_for(dtype)));
    }
  }
}

TEST(KronFactors, LinearEmaWritesThroughAStridedViewOfALargerBuffer) {
  at::manual_seed(6);
  const at::Tensor x = at::randn({6, 4}, at::kDouble);
  at::Tensor buffer = at::randn({5, 10}, at::kDouble);
  const at::Tensor before = buffer.clone();
  at::Tensor factor = buffer.slice(1, 0, 10, 2);  // [5, 5] view, every other column
  ASSERT_FALSE(factor.is_contiguous());
  natgrad::linear_act_factor_ema_(factor, x, true, 0.75);
  const at::Tensor expected = before.slice(1, 0, 10, 2) * 0.75 + ref_linear_act(x, true) * 0.25;
  EXPECT_TRUE(AllClose(buffer.slice(1, 0, 10, 2), expected, kTol64));
  EXPECT_TRUE(at::equal(buffer.slice(1, 1, 10, 2), before.slice(1, 1, 10, 2)));
}

TEST(KronFactors, LinearEmaWithDecayOneKeepsAndDecayZeroReplacesTheFactor) {
  at::manual_seed(7);
  const at::Tensor x = at::randn({8, 3}, at::kDouble);
  at::Tensor factor = natgrad_test::random_spd(4);
  const at::Tensor old = factor.clone();
  natgrad::linear_act_factor_ema_(factor, x, true, 1.0);
  EXPECT_TRUE(AllClose(factor, old, kTol64));
  natgrad::linear_act_factor_ema_(factor, x, true, 0.0);
  EXPECT_TRUE(AllClose(factor, ref_linear_act(x, true), kTol64));
}

TEST(KronFactors, LinearEmaConvertsInputToTheFactorDtype) {
  at::manual_seed(8);
  const at::Tensor x = at::randn({10, 4}, at::kFloat);
  at::Tensor factor = at::eye(4, at::kDouble);
  natgrad::linear_act_factor_ema_(factor, x, false, 0.5);
  EXPECT_EQ(factor.scalar_type(), at::kDouble);
  EXPECT_TRUE(
      AllClose(factor, at::eye(4, at::kDouble) * 0.5 + ref_linear_act(x, false) * 0.5, kTol64));
}

// ---- Linear gradient factor -----------------------------------------------------------------

TEST(KronFactors, LinearGradMatchesReferenceForScalesShapesAndViews) {
  at::manual_seed(9);
  const std::vector<at::Tensor> grads = {
      at::randn({1, 4}, at::kDouble), at::randn({12, 5}, at::kDouble),
      at::randn({3, 4, 6}, at::kDouble), at::randn({7, 9}, at::kDouble).t()};
  for (const at::Tensor& g : grads) {
    for (double scale : {1.0, 12.0, 0.5}) {
      EXPECT_TRUE(
          AllClose(natgrad::linear_grad_factor(g, scale), ref_linear_grad(g, scale), kTol64))
          << "shape " << g.sizes() << " scale " << scale;
    }
  }
  const at::Tensor g32 = at::randn({16, 6}, at::kFloat);
  const at::Tensor G32 = natgrad::linear_grad_factor(g32, 16.0);
  EXPECT_EQ(G32.scalar_type(), at::kFloat);
  EXPECT_TRUE(AllClose(G32, ref_linear_grad(g32, 16.0), kTol32));
}

TEST(KronFactors, LinearGradEmaBlendsOldAndNewInPlace) {
  at::manual_seed(10);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const at::Tensor g = at::randn({4, 3, 6}, dtype);
    at::Tensor factor = natgrad_test::random_spd(6).to(dtype);
    const at::Tensor old = factor.clone();
    const void* storage = factor.data_ptr();
    natgrad::linear_grad_factor_ema_(factor, g, 12.0, 0.95);
    EXPECT_EQ(factor.data_ptr(), storage);
    EXPECT_TRUE(AllClose(factor, old.to(at::kDouble) * 0.95 + ref_linear_grad(g, 12.0) * 0.05,
                         tol_for(dtype)));
  }
}

// ---- Conv2d factors -------------------------------------------------------------------------

TEST(KronFactors, ConvReferencePatchesReproduceConv2d) {
  // Validates the test's own patch extraction (and its (c, i, j) order == weight.view(C_out, -1)).
  at::manual_seed(11);
  for (const ConvCase& cc : conv_cases()) {
    const at::Tensor x = at::randn({cc.n, cc.c, cc.h, cc.w}, at::kDouble);
    const at::Tensor w = at::randn({4, cc.c, cc.kernel[0], cc.kernel[1]}, at::kDouble);
    const at::Tensor y = at::conv2d(x, w, {}, cc.stride, cc.padding, cc.dilation);
    const at::Tensor rows = at::matmul(ref_patches(x, cc), w.reshape({4, -1}).t());
    const at::Tensor expected = rows.reshape({cc.n, y.size(2), y.size(3), 4}).permute({0, 3, 1, 2});
    EXPECT_TRUE(AllClose(y, expected, kTol64));
  }
}

TEST(KronFactors, Conv2dActMatchesReferenceAcrossGeometries) {
  at::manual_seed(12);
  for (const ConvCase& cc : conv_cases()) {
    const at::Tensor x = at::randn({cc.n, cc.c, cc.h, cc.w}, at::kDouble);
    for (bool bias : {false, true}) {
      EXPECT_TRUE(AllClose(conv_act(x, cc, bias), ref_conv_act(x, cc, bias), kTol64))
          << "input " << x.sizes() << " bias " << bias;
    }
  }
}

TEST(KronFactors, Conv2dActMatchesReferenceInFloat32) {
  at::manual_seed(13);
  const ConvCase& cc = conv_cases()[3];
  const at::Tensor x = at::randn({cc.n, cc.c, cc.h, cc.w}, at::kFloat);
  const at::Tensor a = conv_act(x, cc, true);
  EXPECT_EQ(a.scalar_type(), at::kFloat);
  EXPECT_TRUE(AllClose(a, ref_conv_act(x, cc, true), kTol32));
}

TEST(KronFactors, Conv2dActAcceptsNonContiguousInput) {
  at::manual_seed(14);
  const ConvCase cc{3, 3, 6, 6, {3, 3}, {1, 1}, {1, 1}, {1, 1}};
  const at::Tensor channels_last = at::randn({3, 6, 6, 3}, at::kDouble).permute({0, 3, 1, 2});
  const at::Tensor sliced = at::randn({3, 6, 6, 12}, at::kDouble).slice(3, 0, 12, 2);
  for (const at::Tensor& x : {channels_last, sliced}) {
    ASSERT_FALSE(x.is_contiguous());
    EXPECT_TRUE(AllClose(conv_act(x, cc, true), ref_conv_act(x, cc, true), kTol64));
  }
}

TEST(KronFactors, Conv2dActChunksTheBatchIntoSeveralChunks) {
  at::manual_seed(15);
  // C=3, 3x3 kernel: patch_dim 27, factor 28 with bias; a 5x5 input gives 9 positions, so
  // chunks hold 2^18 / 243 = 1078 samples and a batch of 1100 is unfolded as 1078 + 22.
  const ConvCase cc{1100, 3, 5, 5, {3, 3}, {1, 1}, {0, 0}, {1, 1}};
  ASSERT_EQ(natgrad::conv_chunk_samples(27, 9, 28), 1078);
  const at::Tensor x = at::randn({cc.n, cc.c, cc.h, cc.w}, at::kDouble);
  EXPECT_TRUE(AllClose(conv_act(x, cc, true), ref_conv_act(x, cc, true), kTol64));

  // The EMA decays the old factor once, not once per chunk.
  at::Tensor factor = natgrad_test::random_spd(28);
  const at::Tensor old = factor.clone();
  const void* storage = factor.data_ptr();
  natgrad::conv2d_act_factor_ema_(factor, x, cc.kernel, cc.stride, cc.padding, cc.dilation, true,
                                  0.8);
  EXPECT_EQ(factor.data_ptr(), storage);
  EXPECT_TRUE(AllClose(factor, old * 0.8 + ref_conv_act(x, cc, true) * 0.2, kTol64));
}

TEST(KronFactors, Conv2dActEmaBlendsOldAndNewInPlace) {
  at::manual_seed(16);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const ConvCase& cc = conv_cases()[2];
    const at::Tensor x = at::randn({cc.n, cc.c, cc.h, cc.w}, dtype);
    const int64_t dim = cc.c * cc.kernel[0] * cc.kernel[1];
    at::Tensor factor = natgrad_test::random_spd(dim).to(dtype);
    const at::Tensor old = factor.clone();
    const void* storage = factor.data_ptr();
    natgrad::conv2d_act_factor_ema_(factor, x, cc.kernel, cc.stride, cc.padding, cc.dilation, false,
                                    0.9);
    EXPECT_EQ(factor.data_ptr(), storage);
    EXPECT_TRUE(AllClose(factor, old.to(at::kDouble) * 0.9 + ref_conv_act(x, cc, false) * 0.1,
                         tol_for(dtype)));
  }
}

TEST(KronFactors, Conv2dGradMatchesReference) {
  at::manual_seed(17);
  const std::vector<at::Tensor> grads = {
      at::randn({1, 4, 3, 3}, at::kDouble), at::randn({3, 5, 4, 2}, at::kDouble),
      at::randn({2, 3, 3, 6}, at::kDouble).permute({0, 3, 1, 2})};  // non-contiguous
  for (const at::Tensor& g : grads) {
    const double kfc_scale = static_cast<double>(g.size(0)) * std::sqrt(g.size(2) * g.size(3));
    for (double scale : {1.0, kfc_scale}) {
      EXPECT_TRUE(AllClose(natgrad::conv2d_grad_factor(g, scale), ref_conv_grad(g, scale), kTol64))
          << "shape " << g.sizes() << " scale " << scale;
    }
  }
  const at::Tensor g32 = at::randn({4, 6, 3, 3}, at::kFloat);
  EXPECT_TRUE(AllClose(natgrad::conv2d_grad_factor(g32, 4.0), ref_conv_grad(g32, 4.0), kTol32));
}

TEST(KronFactors, Conv2dGradChunksTheBatchAndEmaUpdatesInPlace) {
  at::manual_seed(18);
  // 8 channels over 2x2 positions: chunks of 2^18 / 32 = 8192 samples; a batch of 16389 is
  // 8192 + 8192 + 5.
  ASSERT_EQ(natgrad::conv_chunk_samples(8, 4, 8), 8192);
  const at::Tensor g = at::randn({16389, 8, 2, 2}, at::kDouble);
  EXPECT_TRUE(AllClose(natgrad::conv2d_grad_factor(g, 3.0), ref_conv_grad(g, 3.0), kTol64));
  at::Tensor factor = natgrad_test::random_spd(8);
  const at::Tensor old = factor.clone();
  const void* storage = factor.data_ptr();
  natgrad::conv2d_grad_factor_ema_(factor, g, 3.0, 0.6);
  EXPECT_EQ(factor.data_ptr(), storage);
  EXPECT_TRUE(AllClose(factor, old * 0.6 + ref_conv_grad(g, 3.0) * 0.4, kTol64));
}

TEST(KronFactors, ConvChunkSamplesFollowsItsDocumentedBound) {
  EXPECT_EQ(natgrad::conv_chunk_samples(27, 9, 28), 1078);  // the floor: 2^18 / 243
  EXPECT_EQ(natgrad::conv_chunk_samples(1, 1, 5), natgrad::kConvChunkElements);
  EXPECT_EQ(natgrad::conv_chunk_samples(100, 100, 1000), 100);  // the factor: 10^6 / 10^4
  EXPECT_EQ(natgrad::conv_chunk_samples(1000, 1000, 10), 1);    // never below one sample
  for (int64_t patch : {3, 18, 50, 700})
    for (int64_t pos : {1, 4, 49, 900})
      for (int64_t dim : {4, 19, 51, 701}) {
        const int64_t chunk = natgrad::conv_chunk_samples(patch, pos, dim);
        const int64_t budget = std::max(dim * dim, natgrad::kConvChunkElements);
        EXPECT_GE(chunk, 1);
        if (chunk > 1) EXPECT_LE(chunk * patch * pos, budget);
        EXPECT_GT((chunk + 1) * patch * pos, budget);
      }
}

// ---- Theory: one sample, A (x) G is the exact Fisher ----------------------------------------

TEST(FisherTheory, OneSampleLinearKroneckerProductEqualsExactFisher) {
  at::manual_seed(19);
  const int64_t d_in = 4, d_out = 3;
  const at::Tensor a = at::randn({1, d_in}, at::kDouble);
  const at::Tensor weight = at::randn({d_out, d_in}, at::kDouble).requires_grad_(true);
  const at::Tensor bias = at::randn({d_out}, at::kDouble).requires_grad_(true);
  at::Tensor out = at::linear(a, weight, bias);
  out.retain_grad();
  const at::Tensor target = at::randn({1, d_out}, at::kDouble);
  (out - target).square().sum().mul(0.5).backward();

  // Per-sample gradient of [W | b], stacked column by column.
  const at::Tensor grad_wb = at::cat({weight.grad(), bias.grad().unsqueeze(1)}, 1);
  const at::Tensor v = natgrad_test::vec_columns(grad_wb);
  const at::Tensor exact = at::outer(v, v);

  const at::Tensor A = natgrad::linear_act_factor(a, true);
  const at::Tensor G = natgrad::linear_grad_factor(out.grad(), 1.0);
  EXPECT_TRUE(AllClose(at::kron(A, G), exact, 1e-10));
}

TEST(FisherTheory, OneSampleOnePositionConv2dKroneckerProductEqualsExactFisher) {
  at::manual_seed(20);
  const at::Tensor x = at::randn({1, 2, 3, 3}, at::kDouble);
  const at::Tensor weight = at::randn({3, 2, 3, 3}, at::kDouble).requires_grad_(true);
  const at::Tensor bias = at::randn({3}, at::kDouble).requires_grad_(true);
  at::Tensor out = at::conv2d(x, weight, bias);  // [1, 3, 1, 1]
  out.retain_grad();
  out.square().sum().mul(0.5).backward();

  const at::Tensor grad_wb = at::cat({weight.grad().reshape({3, -1}), bias.grad().unsqueeze(1)}, 1);
  const at::Tensor v = natgrad_test::vec_columns(grad_wb);
  const at::Tensor A = natgrad::conv2d_act_factor(x, {3, 3}, {1, 1}, {0, 0}, {1, 1}, true);
  const at::Tensor G = natgrad::conv2d_grad_factor(out.grad(), 1.0);
  EXPECT_TRUE(AllClose(at::kron(A, G), at::outer(v, v), 1e-10));
}

// ---- decay = 0 replaces the factor; degenerate Linear inputs -------------------------------

at::Tensor nan_factor(int64_t d) {
  return at::full({d, d}, std::numeric_limits<double>::quiet_NaN(), at::kDouble);
}

TEST(KronFactors, DecayZeroReplacesBiasRowOfNanFactor) {
  at::manual_seed(31);
  const at::Tensor x = at::randn({6, 3}, at::kDouble);
  at::Tensor factor = nan_factor(4);
  natgrad::linear_act_factor_ema_(factor, x, /*bias=*/true, /*decay=*/0.0);
  EXPECT_TRUE(AllClose(factor, ref_linear_act(x, true), kTol64));
}

TEST(KronFactors, DecayZeroReplacesEveryNanFactorOfEveryEmaOp) {
  at::manual_seed(32);
  const at::Tensor g = at::randn({2, 5, 3}, at::kDouble);
  at::Tensor lg = nan_factor(3);
  natgrad::linear_grad_factor_ema_(lg, g, 2.0, 0.0);
  EXPECT_TRUE(AllClose(lg, ref_linear_grad(g, 2.0), kTol64));

  const at::Tensor img = at::randn({2, 2, 5, 5}, at::kDouble);
  for (bool bias : {true, false}) {
    at::Tensor ca = nan_factor(2 * 9 + (bias ? 1 : 0));
    natgrad::conv2d_act_factor_ema_(ca, img, {3, 3}, {1, 1}, {1, 1}, {1, 1}, bias, 0.0);
    EXPECT_TRUE(
        AllClose(ca, natgrad::conv2d_act_factor(img, {3, 3}, {1, 1}, {1, 1}, {1, 1}, bias), kTol64))
        << "bias " << bias;
  }
  at::Tensor cg = nan_factor(2);
  natgrad::conv2d_grad_factor_ema_(cg, img, 1.5, 0.0);
  EXPECT_TRUE(AllClose(cg, natgrad::conv2d_grad_factor(img, 1.5), kTol64));
}

TEST(KronFactors, LinearInputWithZeroFeaturesGivesTheBiasEntryAlone) {
  const at::Tensor x = at::randn({5, 0}, at::kDouble);
  EXPECT_TRUE(AllClose(natgrad::linear_act_factor(x, true), at::ones({1, 1}, at::kDouble), kTol64));
  EXPECT_EQ(natgrad::linear_act_factor(x, false).sizes(), (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(natgrad::linear_act_factor(at::randn({2, 3, 0}), false).sizes(),
            (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(natgrad::linear_grad_factor(at::randn({4, 0}), 1.0).sizes(),
            (std::vector<int64_t>{0, 0}));
}

TEST(KronFactorErrors, Conv2dRejectsAnInputWithoutChannels) {
  EXPECT_TRUE(ThrowsMentioning(
      [] {
        natgrad::conv2d_act_factor(at::randn({2, 0, 4, 4}), {3, 3}, {1, 1}, {0, 0}, {1, 1}, true);
      },
      {"input", "at least one channel"}));
}

// ---- Argument errors ------------------------------------------------------------------------

TEST(KronFactorErrors, LinearRejectsBadInputsNamingTheArgument) {
  const at::Tensor x = at::randn({4, 3});
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::linear_act_factor(at::ones({4, 3}, at::kLong), true);
      },
      {"input", "floating"}));
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::linear_act_factor(at::randn({}), true); },
                               {"input", "dimensions"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::linear_act_factor(at::randn({0, 3}), false);
      },
      {"input", "empty batch"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::linear_grad_factor(at::ones({4, 3}, at::kInt), 1.0);
      },
      {"grad_output", "floating"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::linear_grad_factor(at::randn({2, 0, 3}), 1.0);
      },
      {"grad_output", "empty batch"}));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (double scale : {0.0, -2.0, nan, inf}) {
    EXPECT_TRUE(ThrowsMentioning([&] { natgrad::linear_grad_factor(x, scale); }, {"grad_scale"}));
  }
}

TEST(KronFactorErrors, EmaRejectsBadDecayAndMismatchedFactors) {
  const at::Tensor x = at::randn({4, 3});
  at::Tensor factor = at::eye(4);
  for (double decay : {-0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    EXPECT_TRUE(ThrowsMentioning([&] { natgrad::linear_act_factor_ema_(factor, x, true, decay); },
                                 {"decay"}));
    EXPECT_TRUE(ThrowsMentioning(
        [&] {
          natgrad::linear_grad_factor_ema_(factor, at::randn({2, 4}), 1.0, decay);
        },
        {"decay"}));
  }
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::linear_act_factor_ema_(factor, x, false, 0.5); },
                               {"factor", "shape"}));
  at::Tensor long_factor = at::zeros({4, 4}, at::kLong);
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::linear_act_factor_ema_(long_factor, x, true, 0.5); },
                               {"factor", "floating"}));
  at::Tensor conv_factor = at::eye(5);
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::conv2d_act_factor_ema_(conv_factor, at::randn({1, 2, 4, 4}), {2, 2}, {1, 1},
                                        {0, 0}, {1, 1}, false, 0.5);
      },
      {"factor", "shape"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::conv2d_grad_factor_ema_(conv_factor, at::randn({1, 5, 2, 2}), 1.0, 2.0);
      },
      {"decay"}));
  EXPECT_EQ(factor.equal(at::eye(4)), true);  // failed calls leave the factor untouched
}

TEST(KronFactorErrors, Conv2dRejectsBadGeometryNamingTheArgument) {
  const at::Tensor x = at::randn({2, 3, 5, 5});
  auto call = [&](const at::Tensor& in, std::vector<int64_t> k, std::vector<int64_t> s,
                  std::vector<int64_t> p, std::vector<int64_t> d) {
    return [=] { natgrad::conv2d_act_factor(in, k, s, p, d, true); };
  };
  EXPECT_TRUE(ThrowsMentioning(call(at::randn({3, 5, 5}), {3, 3}, {1, 1}, {0, 0}, {1, 1}),
                               {"input", "4-D"}));
  EXPECT_TRUE(ThrowsMentioning(call(x.to(at::kLong), {3, 3}, {1, 1}, {0, 0}, {1, 1}),
                               {"input", "floating"}));
  EXPECT_TRUE(ThrowsMentioning(call(at::randn({0, 3, 5, 5}), {3, 3}, {1, 1}, {0, 0}, {1, 1}),
                               {"input", "empty batch"}));
  EXPECT_TRUE(ThrowsMentioning(call(x, {3}, {1, 1}, {0, 0}, {1, 1}), {"kernel_size"}));
  EXPECT_TRUE(ThrowsMentioning(call(x, {3, 0}, {1, 1}, {0, 0}, {1, 1}), {"kernel_size"}));
  EXPECT_TRUE(ThrowsMentioning(call(x, {3, 3}, {0, 1}, {0, 0}, {1, 1}), {"stride"}));
  EXPECT_TRUE(ThrowsMentioning(call(x, {3, 3}, {1, 1}, {-1, 0}, {1, 1}), {"padding"}));
  EXPECT_TRUE(ThrowsMentioning(call(x, {3, 3}, {1, 1}, {0, 0}, {1, 0}), {"dilation"}));
  EXPECT_TRUE(ThrowsMentioning(call(x, {3, 3}, {1, 1}, {0, 0}, {3, 3}), {"too small"}));
  EXPECT_TRUE(ThrowsMentioning(
      [] {
        natgrad::conv2d_grad_factor(at::randn({2, 3, 4}), 1.0);
      },
      {"grad_output", "4-D"}));
  EXPECT_TRUE(ThrowsMentioning(
      [] {
        natgrad::conv2d_grad_factor(at::randn({2, 3, 0, 4}), 1.0);
      },
      {"grad_output", "empty batch"}));
  EXPECT_TRUE(ThrowsMentioning(
      [] {
        natgrad::conv2d_grad_factor(at::randn({2, 3, 2, 2}), -1.0);
      },
      {"grad_scale"}));
}

// ---- The dispatcher: ops registered by the C++ library itself -------------------------------

constexpr std::array<const char*, 17> kOps = {"natgrad::linear_act_factor",
                                              "natgrad::linear_act_factor_ema_",
                                              "natgrad::conv2d_act_factor",
                                              "natgrad::conv2d_act_factor_ema_",
                                              "natgrad::linear_grad_factor",
                                              "natgrad::linear_grad_factor_ema_",
                                              "natgrad::conv2d_grad_factor",
                                              "natgrad::conv2d_grad_factor_ema_",
                                              "natgrad::damped_eigh",
                                              "natgrad::kfac_precondition_eigen",
                                              "natgrad::kfac_damped_inverses",
                                              "natgrad::kfac_precondition_inverse",
                                              "natgrad::woodbury_solve",
                                              "natgrad::linear_diag_fisher",
                                              "natgrad::kfac_factors_ema_",
                                              "natgrad::ewc_penalty",
                                              "natgrad::kfac_precondition_diagonal_a"};

TEST(Dispatcher, EveryOperatorIsAnAtenCompositionRegisteredForEveryDevice) {
  for (const char* name : kOps) {
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
    EXPECT_TRUE(op.hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd)) << name;
    EXPECT_TRUE(op.hasComputedKernelForDispatchKey(c10::DispatchKey::CPU)) << name;
    EXPECT_TRUE(op.hasComputedKernelForDispatchKey(c10::DispatchKey::CUDA)) << name;
  }
}

TEST(Dispatcher, OnlyTheEwcPenaltyHasACpuOnlyKernel) {
  for (const char* name : kOps) {
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
    EXPECT_EQ(op.hasKernelForDispatchKey(c10::DispatchKey::CPU),
              std::string(name) == "natgrad::ewc_penalty")
        << name;
  }
}

TEST(Dispatcher, LinearActFactorThroughTheDispatcherMatchesTheDirectCall) {
  at::manual_seed(21);
  const at::Tensor x = at::randn({6, 4}, at::kDouble);
  const at::Tensor a = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("natgrad::linear_act_factor", "")
                           .typed<at::Tensor(const at::Tensor&, bool)>()
                           .call(x, true);
  EXPECT_TRUE(AllClose(a, ref_linear_act(x, true), kTol64));
}

TEST(Dispatcher, MutatingEmaOpUpdatesTheFactorThroughTheDispatcher) {
  at::manual_seed(22);
  const at::Tensor g = at::randn({5, 3}, at::kDouble);
  at::Tensor factor = at::eye(3, at::kDouble);
  c10::Dispatcher::singleton()
      .findSchemaOrThrow("natgrad::linear_grad_factor_ema_", "")
      .typed<void(at::Tensor&, const at::Tensor&, double, double)>()
      .call(factor, g, 2.0, 0.5);
  EXPECT_TRUE(
      AllClose(factor, at::eye(3, at::kDouble) * 0.5 + ref_linear_grad(g, 2.0) * 0.5, kTol64));
}

}  // namespace
