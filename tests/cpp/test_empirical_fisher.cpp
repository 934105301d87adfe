// Empirical-Fisher ops (empirical/empirical_fisher.h): the Woodbury solve against a dense p x p
// solve, and the per-sample diagonal Fisher of a Linear layer against an explicit sample loop.
#include <limits>
#include <tuple>
#include <vector>

#include "natgrad.h"
#include "test_helpers.h"

namespace {

using natgrad::Rung;
using natgrad::testing::force_ladder_failures;
using natgrad_test::AllClose;
using natgrad_test::AllFinite;
using natgrad_test::kTol32;
using natgrad_test::kTol64;
using natgrad_test::ThrowsMentioning;
using natgrad_test::tol_for;

class Woodbury : public natgrad_test::LadderTest {};

// (U^T U / n + damping I)^-1 rhs with the p x p matrix formed explicitly.
at::Tensor ref_woodbury(const at::Tensor& u, const at::Tensor& rhs, double damping) {
  const at::Tensor u64 = u.to(at::kDouble);
  const at::Tensor f = at::matmul(u64.t(), u64) / static_cast<double>(u.size(0)) +
                       at::eye(u.size(1), at::kDouble) * damping;
  return at::linalg_solve(f, rhs.to(at::kDouble));
}

// grad_scale^2 / N * sum_n (g_n^T a_n)^2, one sample at a time; g_n, a_n are [positions, d].
at::Tensor ref_diag_fisher(const at::Tensor& input, const at::Tensor& grad_output, bool bias,
                           double grad_scale) {
  const int64_t samples = input.size(0);
  const at::Tensor x = input.to(at::kDouble), g = grad_output.to(at::kDouble);
  at::Tensor sum;
  for (int64_t s = 0; s < samples; ++s) {
    const at::Tensor a_s = x[s].reshape({-1, input.size(-1)});
    const at::Tensor g_s = g[s].reshape({-1, grad_output.size(-1)});
    at::Tensor grad = at::matmul(g_s.t(), a_s);                    // [d_out, d_in]
    if (bias) grad = at::cat({grad, g_s.sum(0).unsqueeze(1)}, 1);  // bias column last
    sum = s == 0 ? grad.square() : sum + grad.square();
  }
  return sum * (grad_scale * grad_scale / static_cast<double>(samples));
}

// ---- Woodbury -------------------------------------------------------------------------------

TEST_F(Woodbury, EqualsTheDenseSolveForVectorAndMatrixRightHandSides) {
  at::manual_seed(300);
  // n < p (the Woodbury regime), n > p, and a single sample.
  for (auto [n, p] : std::vector<std::pair<int64_t, int64_t>>{{5, 12}, {20, 6}, {1, 4}}) {
    for (auto dtype : {at::kDouble, at::kFloat}) {
      const at::Tensor u = at::randn({n, p}, dtype);
      for (const at::Tensor& rhs : {at::randn({p}, dtype), at::randn({p, 3}, dtype)}) {
        const auto [x, rung] = natgrad::woodbury_solve(u, rhs, 0.1);
        EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kNative));
        EXPECT_EQ(x.scalar_type(), dtype);
        EXPECT_TRUE(AllClose(x, ref_woodbury(u, rhs, 0.1), tol_for(dtype)))
            << "n=" << n << " p=" << p << " rhs " << rhs.sizes() << " " << dtype;
      }
    }
  }
}

TEST_F(Woodbury, AcceptsNonContiguousInputsAndLargeDamping) {
  at::manual_seed(301);
  const at::Tensor u = at::randn({9, 4}, at::kDouble).t();    // [4, 9]
  const at::Tensor rhs = at::randn({3, 9}, at::kDouble).t();  // [9, 3]
  ASSERT_FALSE(u.is_contiguous());
  ASSERT_FALSE(rhs.is_contiguous());
  for (double damping : {1e-3, 1.0, 100.0}) {
    const auto [x, rung] = natgrad::woodbury_solve(u, rhs, damping);
    EXPECT_TRUE(AllClose(x, ref_woodbury(u, rhs, damping), kTol64)) << damping;
    EXPECT_TRUE(x.is_contiguous());
  }
}

TEST_F(Woodbury, ReportsTheLadderRungAndStaysAccurate) {
  at::manual_seed(302);
  const at::Tensor u = at::randn({6, 10}, at::kFloat);
  const at::Tensor rhs = at::randn({10}, at::kFloat);
  const at::Tensor ref = ref_woodbury(u, rhs, 0.5);

  // The n x n system is always float64, so one forced failure already lands on jitter.
  force_ladder_failures(1);
  auto [x, rung] = natgrad::woodbury_solve(u, rhs, 0.5);
  EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kJitter));
  EXPECT_TRUE(AllClose(x, ref, kTol32));

  force_ladder_failures(1 + natgrad::kJitterSteps);
  std::tie(x, rung) = natgrad::woodbury_solve(u, rhs, 0.5);
  EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kDiagonal));
  EXPECT_TRUE(AllFinite(x));
  // Jacobi fallback for the small system: y = (U v) / diag(U U^T + n damping I).
  const at::Tensor u64 = u.to(at::kDouble);
  const at::Tensor y =
      at::matmul(u64, rhs.to(at::kDouble)) / (at::matmul(u64, u64.t()).diagonal() + 6 * 0.5);
  EXPECT_TRUE(AllClose(x, (rhs.to(at::kDouble) - at::matmul(u64.t(), y)) / 0.5, kTol32));
}

TEST_F(Woodbury, RejectsBadArgumentsNamingThem) {
  const at::Tensor u = at::randn({4, 6});
  EXPECT_TRUE(
      ThrowsMentioning([&] { natgrad::woodbury_solve(at::randn({6}), at::randn({6}), 0.1); },
                       {"per_sample_grads", "2-D"}));
  EXPECT_TRUE(
      ThrowsMentioning([&] { natgrad::woodbury_solve(u.to(at::kLong), at::randn({6}), 0.1); },
                       {"per_sample_grads", "floating"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::woodbury_solve(at::randn({0, 6}), at::randn({6}), 0.1);
      },
      {"per_sample_grads", "empty batch"}));
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::woodbury_solve(u, at::randn({5}), 0.1); },
                               {"rhs", "n_params"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::woodbury_solve(u, at::randn({6, 2, 2}), 0.1);
      },
      {"rhs"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] { natgrad::woodbury_solve(u, at::randn({6}, at::kDouble), 0.1); }, {"rhs", "dtype"}));
  for (double damping : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN()}) {
    EXPECT_TRUE(ThrowsMentioning([&] { natgrad::woodbury_solve(u, at::randn({6}), damping); },
                                 {"damping"}));
  }
}

// ---- Diagonal empirical Fisher of a Linear layer --------------------------------------------

TEST(LinearDiagFisher, TwoDimensionalInputMatchesThePerSampleLoop) {
  at::manual_seed(310);
  for (auto dtype : {at::kDouble, at::kFloat}) {
    for (int64_t n : {1, 7}) {
      const at::Tensor x = at::randn({n, 5}, dtype), g = at::randn({n, 3}, dtype);
      for (bool bias : {false, true}) {
        for (double scale : {1.0, static_cast<double>(n)}) {
          const at::Tensor f = natgrad::linear_diag_fisher(x, g, bias, scale);
          EXPECT_EQ(f.scalar_type(), dtype);
          EXPECT_EQ(f.sizes(), (at::IntArrayRef{3, bias ? 6 : 5}));
          EXPECT_TRUE(AllClose(f, ref_diag_fisher(x, g, bias, scale), tol_for(dtype)))
              << "n=" << n << " bias " << bias << " scale " << scale;
        }
      }
    }
  }
}

TEST(LinearDiagFisher, PositionsAreSummedInsideEachSamplesGradient) {
  at::manual_seed(311);
  for (auto shape : std::vector<std::vector<int64_t>>{{4, 6}, {3, 2, 5}, {1, 3}}) {
    std::vector<int64_t> in_shape = shape, out_shape = shape;
    in_shape.push_back(4);
    out_shape.push_back(3);
    for (auto dtype : {at::kDouble, at::kFloat}) {
      const at::Tensor x = at::randn(in_shape, dtype), g = at::randn(out_shape, dtype);
      for (bool bias : {false, true}) {
        EXPECT_TRUE(AllClose(natgrad::linear_diag_fisher(x, g, bias, 2.0),
                             ref_diag_fisher(x, g, bias, 2.0), tol_for(dtype)))
            << "input " << x.sizes() << " bias " << bias;
      }
    }
  }
}

TEST(LinearDiagFisher, DiffersFromSummingSquaresPerPosition) {
  // Guards the semantics: with positions, the square is of the summed per-sample gradient.
  const at::Tensor x = at::ones({1, 2, 1}, at::kDouble);
  const at::Tensor g = at::ones({1, 2, 1}, at::kDouble);
  const at::Tensor f = natgrad::linear_diag_fisher(x, g, true, 1.0);
  EXPECT_TRUE(AllClose(f, at::full({1, 2}, 4.0, at::kDouble), kTol64));  // (1 + 1)^2
}

TEST(LinearDiagFisher, AcceptsNonContiguousInputs) {
  at::manual_seed(312);
  const at::Tensor x = at::randn({5, 4, 6}, at::kDouble).transpose(0, 1);    // [4, 5, 6]
  const at::Tensor g = at::randn({4, 5, 6}, at::kDouble).slice(2, 0, 6, 2);  // [4, 5, 3]
  ASSERT_FALSE(x.is_contiguous());
  ASSERT_FALSE(g.is_contiguous());
  EXPECT_TRUE(AllClose(natgrad::linear_diag_fisher(x, g, true, 4.0),
                       ref_diag_fisher(x, g, true, 4.0), kTol64));
  const at::Tensor x2 = at::randn({6, 8}, at::kDouble).t();
  const at::Tensor g2 = at::randn({2, 8}, at::kDouble).t();
  EXPECT_TRUE(AllClose(natgrad::linear_diag_fisher(x2, g2, false, 1.0),
                       ref_diag_fisher(x2, g2, false, 1.0), kTol64));
}

TEST(LinearDiagFisher, ChunkedPerSampleGradientsMatchTheLoop) {
  // d_out * d_in just above 2^21: the per-sample block budget holds one sample per chunk.
  at::manual_seed(313);
  const int64_t d_out = 1024, d_in = 2049;
  const at::Tensor x = at::randn({3, 2, d_in}, at::kFloat);
  const at::Tensor g = at::randn({3, 2, d_out}, at::kFloat);
  EXPECT_TRUE(AllClose(natgrad::linear_diag_fisher(x, g, true, 3.0),
                       ref_diag_fisher(x, g, true, 3.0), kTol32));
}

TEST(LinearDiagFisher, RejectsBadArgumentsNamingThem) {
  const at::Tensor x = at::randn({4, 3}), g = at::randn({4, 2});
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::linear_diag_fisher(at::randn({3}), g, true, 1.0); },
                               {"input", "dimensions"}));
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::linear_diag_fisher(x.to(at::kLong), g, true, 1.0); },
                               {"input", "floating"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::linear_diag_fisher(x, at::randn({5, 2}), true, 1.0);
      },
      {"grad_output", "leading dims"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::linear_diag_fisher(at::randn({4, 2, 3}), at::randn({4, 3, 2}), true, 1.0);
      },
      {"grad_output"}));
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::linear_diag_fisher(x, g.unsqueeze(1), true, 1.0); },
                               {"grad_output"}));
  EXPECT_TRUE(
      ThrowsMentioning([&] { natgrad::linear_diag_fisher(x, g.to(at::kDouble), true, 1.0); },
                       {"grad_output", "dtype"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::linear_diag_fisher(at::randn({0, 3}), at::randn({0, 2}), true, 1.0);
      },
      {"input", "empty batch"}));
  for (double scale : {0.0, -3.0, std::numeric_limits<double>::infinity()}) {
    EXPECT_TRUE(
        ThrowsMentioning([&] { natgrad::linear_diag_fisher(x, g, true, scale); }, {"grad_scale"}));
  }
}

// (U^T U / n + damping I)^-1 rhs in float64 through the SVD of U: exact at any scale of U (the
// dense p x p matrix of rows ~1e30 has condition ~1e61 and cannot be solved directly).
at::Tensor ref_woodbury_svd(const at::Tensor& u, const at::Tensor& rhs, double damping) {
  const at::Tensor u64 = u.to(at::kDouble), r = rhs.to(at::kDouble);
  auto [unused, s, vh] = at::linalg_svd(u64, /*full_matrices=*/false);
  const at::Tensor c = at::matmul(vh, r);
  const at::Tensor inside = (s.square() / static_cast<double>(u.size(0)) + damping).unsqueeze(1);
  return at::matmul(vh.t(), c / inside) + (r - at::matmul(vh.t(), c)) / damping;
}

TEST_F(Woodbury, Float32RowsNearOverflowMatchTheFloat64Reference) {
  at::manual_seed(81);
  for (double scale : {1.0, 1e20, 1e30, 1e37}) {
    const at::Tensor u = (at::randn({8, 50}, at::kDouble) * scale).to(at::kFloat);
    const at::Tensor rhs = at::randn({50, 2});
    const auto [x, rung] = natgrad::woodbury_solve(u, rhs, 0.1);
    EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kNative)) << "scale " << scale;
    EXPECT_EQ(x.scalar_type(), at::kFloat);
    EXPECT_TRUE(AllClose(x, ref_woodbury_svd(u, rhs, 0.1), 1e-5)) << "scale " << scale;
  }
}

TEST(LinearDiagFisher, RejectsNanOrInfNamingTheArgument) {
  at::manual_seed(82);
  for (const std::vector<int64_t>& lead : {std::vector<int64_t>{6}, std::vector<int64_t>{6, 2}}) {
    std::vector<int64_t> in_shape = lead, out_shape = lead;
    in_shape.push_back(3);
    out_shape.push_back(4);
    const at::Tensor x = at::randn(in_shape), g = at::randn(out_shape);
    at::Tensor bad_x = x.clone(), bad_g = g.clone();
    bad_x.view({-1})[4] = std::numeric_limits<float>::quiet_NaN();
    bad_g.view({-1})[5] = -std::numeric_limits<float>::infinity();
    EXPECT_TRUE(ThrowsMentioning([&] { natgrad::linear_diag_fisher(bad_x, g, true, 1.0); },
                                 {"input contains NaN or Inf"}));
    EXPECT_TRUE(ThrowsMentioning([&] { natgrad::linear_diag_fisher(x, bad_g, false, 1.0); },
                                 {"grad_output contains NaN or Inf"}));
  }
}

TEST(LinearDiagFisher, InputWithZeroFeaturesGivesTheBiasColumnAlone) {
  const at::Tensor x = at::randn({5, 3, 0}, at::kDouble), g = at::randn({5, 3, 2}, at::kDouble);
  const at::Tensor out = natgrad::linear_diag_fisher(x, g, true, 1.0);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 1}));
  EXPECT_TRUE(AllClose(out.squeeze(1), g.sum(1).square().mean(0), kTol64));
}

}  // namespace
