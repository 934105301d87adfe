// EKFAC's corrected diagonal (factors/ekfac_diagonal.h) and its preconditioner
// (kfac_precondition_ekfac) against float64 loops over explicit per-sample gradients.
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "natgrad.h"
#include "test_helpers.h"

namespace {

using natgrad_test::AllClose;
using natgrad_test::kTol64;
using natgrad_test::ThrowsMentioning;

at::Tensor basis(int64_t d) {
  const at::Tensor m = at::randn({d, d + 2}, at::kDouble);
  return std::get<1>(at::linalg_eigh(at::matmul(m, m.t()))).contiguous();
}

// sum_i (V_G^T dW_i V_A)^2 / samples.
at::Tensor ref_corrected(const std::vector<at::Tensor>& grads, const at::Tensor& vg,
                         const at::Tensor& va, int64_t samples) {
  at::Tensor total = at::zeros_like(grads.front());
  for (const at::Tensor& dw : grads) {
    total += at::matmul(at::matmul(vg.t(), dw), va).square();
  }
  return total / static_cast<double>(samples);
}

TEST(EkfacDiagonal, LinearWithPositionsAndPassesMatchesPerSampleLoop) {
  at::manual_seed(0);
  const int64_t n = 3, positions = 4, d_in = 3, d_out = 2, passes = 2;
  const double scale = 1.5;
  const at::Tensor x = at::randn({n, positions, d_in}, at::kDouble);
  const at::Tensor g = at::randn({passes * n, positions, d_out}, at::kDouble);
  const at::Tensor vg = basis(d_out), va = basis(d_in + 1);
  std::vector<at::Tensor> grads;
  for (int64_t p = 0; p < passes; ++p) {
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor rows = at::cat({x[i], at::ones({positions, 1}, at::kDouble)}, 1);
      grads.push_back(at::matmul(g[p * n + i].t(), rows) * scale);
    }
  }
  at::Tensor diag = at::full({d_out, d_in + 1}, std::nan(""), at::kDouble);
  const at::Tensor ok = natgrad::linear_ekfac_diagonal_ema_(diag, x, g, vg, va, true, scale, 0.0);
  EXPECT_TRUE(ok.item<bool>());
  EXPECT_TRUE(AllClose(diag, ref_corrected(grads, vg, va, n), kTol64, 1e-12));
}

TEST(EkfacDiagonal, LinearWithoutPositionsIsTheSquaredGemm) {
  at::manual_seed(1);
  const at::Tensor x = at::randn({7, 4}, at::kDouble), g = at::randn({7, 3}, at::kDouble);
  const at::Tensor vg = basis(3), va = basis(4);
  const at::Tensor old = at::rand({3, 4}, at::kDouble);
  at::Tensor diag = old.clone();
  natgrad::linear_ekfac_diagonal_ema_(diag, x, g, vg, va, false, 2.0, 0.5);
  const at::Tensor fresh =
      at::matmul(at::matmul(g * 2.0, vg).square().t(), at::matmul(x, va).square()) / 7.0;
  EXPECT_TRUE(AllClose(diag, old * 0.5 + fresh * 0.5, kTol64, 1e-12));
}

TEST(EkfacDiagonal, Conv2dMatchesPerSampleWeightGradients) {
  at::manual_seed(2);
  const at::Tensor x = at::randn({2, 2, 6, 5}, at::kDouble);
  const at::Tensor g = at::randn({2, 3, 4, 3}, at::kDouble);  // kernel 2x3, stride 2, pad 1: 4x3
  const std::vector<int64_t> k{2, 3}, s{2, 2}, p{1, 1}, d{1, 1};
  const at::Tensor vg = basis(3), va = basis(13);
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < 2; ++i) {
    const at::Tensor patches = at::im2col(x.narrow(0, i, 1), k, d, p, s)[0];  // [12, L]
    const at::Tensor gi = g[i].reshape({3, -1});
    grads.push_back(at::cat({at::matmul(gi, patches.t()), gi.sum(1, true)}, 1));
  }
  at::Tensor diag = at::zeros({3, 13}, at::kDouble);
  natgrad::conv2d_ekfac_diagonal_ema_(diag, x, g, vg, va, k, s, p, d, true, 1.0, 0.0);
  EXPECT_TRUE(AllClose(diag, ref_corrected(grads, vg, va, 2), kTol64, 1e-12));
}

TEST(EkfacDiagonal, EmbeddingSumsRepeatedIndicesBeforeSquaring) {
  at::manual_seed(3);
  const at::Tensor idx = at::tensor({0, 2, 2, 1, 1, 1}, at::kLong).reshape({2, 3});
  const at::Tensor g = at::randn({2, 3, 2}, at::kDouble);
  const at::Tensor vg = basis(2);
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < 2; ++i) {
    at::Tensor dw = at::zeros({2, 4}, at::kDouble);
    for (int64_t r = 0; r < 3; ++r) {
      const int64_t col = idx[i][r].item<int64_t>();
      dw.select(1, col).add_(g[i][r]);
    }
    grads.push_back(dw);
  }
  at::Tensor diag = at::zeros({2, 4}, at::kDouble);
  natgrad::embedding_ekfac_diagonal_ema_(diag, idx, g, vg, 1.0, 0.0);
  EXPECT_TRUE(AllClose(diag, ref_corrected(grads, vg, at::eye(4, at::kDouble), 2), kTol64, 1e-12));
}

TEST(EkfacDiagonal, NonFiniteUpdateLeavesTheDiagonalUnchanged) {
  at::Tensor x = at::randn({4, 3}, at::kDouble);
  x[1][2] = std::numeric_limits<double>::infinity();
  const at::Tensor old = at::rand({2, 4}, at::kDouble);
  at::Tensor diag = old.clone();
  const at::Tensor ok = natgrad::linear_ekfac_diagonal_ema_(diag, x, at::randn({4, 2}, at::kDouble),
                                                            basis(2), basis(4), true, 1.0, 0.5);
  EXPECT_FALSE(ok.item<bool>());
  EXPECT_TRUE(at::equal(diag, old));
}

TEST(EkfacDiagonal, BadArgumentsAreNamed) {
  at::Tensor diag = at::zeros({2, 3}, at::kDouble);
  const at::Tensor x = at::randn({4, 3}, at::kDouble), g = at::randn({4, 2}, at::kDouble);
  EXPECT_TRUE(ThrowsMentioning(
      [&] { natgrad::linear_ekfac_diagonal_ema_(diag, x, g, basis(2), basis(4), true, 1.0, 0.5); },
      {"diagonal must have shape [2, 4]"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::linear_ekfac_diagonal_ema_(diag, x, g.narrow(0, 0, 3), basis(2), basis(3), false,
                                            1.0, 0.5);
      },
      {"whole number of passes"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] { natgrad::linear_ekfac_diagonal_ema_(diag, x, g, basis(2), basis(3), false, 1.0, 2.0); },
      {"decay"}));
}

TEST(EkfacPrecondition, EqualsTheDenseDampedSolveInTheBasis) {
  at::manual_seed(4);
  const at::Tensor vg = basis(3), va = basis(2);
  const at::Tensor s = at::rand({3, 2}, at::kDouble), dw = at::randn({3, 2}, at::kDouble);
  // column-stacking vec: vec(V_G X V_A^T) = (V_A (x) V_G) vec(X)
  const at::Tensor q = at::kron(va, vg);
  const at::Tensor fisher =
      at::matmul(at::matmul(q, at::diag(natgrad_test::vec_columns(s))), q.t());
  const at::Tensor expected = natgrad_test::unvec_columns(
      at::linalg_solve(fisher + at::eye(6, at::kDouble) * 0.2, natgrad_test::vec_columns(dw)), 3,
      2);
  EXPECT_TRUE(AllClose(natgrad::kfac_precondition_ekfac(dw, vg, va, s, 0.2), expected, kTol64));
  EXPECT_TRUE(ThrowsMentioning(
      [&] { natgrad::kfac_precondition_ekfac(dw, vg, va, s.t().contiguous(), 0.2); },
      {"eigenvalues must have shape [3, 2]"}));
}

TEST(EkfacRebase, SameBasisKeepsTheDiagonal) {
  const at::Tensor vg = basis(3), va = basis(4), s = at::rand({3, 4}, at::kDouble);
  EXPECT_TRUE(AllClose(natgrad::ekfac_rebase(s, vg, vg, va, va), s, kTol64, 1e-12));
  const at::Tensor moved = natgrad::ekfac_rebase(s, vg, basis(3), va, basis(4));
  EXPECT_NEAR(moved.sum().item<double>(), s.sum().item<double>(), 1e-10);  // doubly stochastic
}

}  // namespace
