// Implicit per-sample gradient rows (empirical/layer_gram.h) against explicit per-sample
// gradients built one sample at a time, and the Woodbury solve's p x p system.
#include <tuple>
#include <vector>

#include "natgrad.h"
#include "test_helpers.h"

namespace {

using natgrad::Rung;
using natgrad_test::AllClose;
using natgrad_test::kTol64;
using natgrad_test::ThrowsMentioning;

// Row r: sum_t g_rt a_(r%N)t^T flattened (+ sum_t g_rt for the bias), one row at a time.
at::Tensor linear_rows_reference(const at::Tensor& x, const at::Tensor& g, bool bias) {
  const int64_t n = x.size(0), rows = g.size(0);
  std::vector<at::Tensor> out;
  for (int64_t r = 0; r < rows; ++r) {
    const at::Tensor a = x[r % n].reshape({-1, x.size(-1)});
    const at::Tensor gr = g[r].reshape({-1, g.size(-1)});
    at::Tensor row = at::matmul(gr.t(), a).reshape({-1});
    if (bias) row = at::cat({row, gr.sum(0)});
    out.push_back(row);
  }
  return at::stack(out);
}

void expect_rows(const at::Tensor& u, const at::Tensor& gram, const at::Tensor& uv,
                 const at::Tensor& v, const at::Tensor& utw, const at::Tensor& w) {
  EXPECT_TRUE(AllClose(gram, at::matmul(u, u.t()), kTol64));
  EXPECT_TRUE(AllClose(uv, at::matmul(u, v), kTol64));
  EXPECT_TRUE(AllClose(utw, at::matmul(u.t(), w), kTol64));
}

TEST(LayerGram, LinearRowsEqualPerSampleGradientsWithPositionsAndPasses) {
  at::manual_seed(700);
  // {samples, positions, d_in, d_out, passes}: one position; pairwise form; per-sample form.
  for (auto [n, t, d_in, d_out, passes] :
       std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>>{
           {5, 1, 4, 3, 1}, {4, 3, 2, 3, 2}, {3, 4, 30, 20, 1}}) {
    const at::Tensor x = at::randn({n, t, d_in}, at::kDouble);
    const at::Tensor g = at::randn({passes * n, t, d_out}, at::kDouble);
    const at::Tensor u = linear_rows_reference(x, g, true);
    const at::Tensor v = at::randn({u.size(1)}, at::kDouble),
                     w = at::randn({u.size(0)}, at::kDouble);
    const at::Tensor weight = v.narrow(0, 0, d_out * d_in).reshape({d_out, d_in});
    const at::Tensor bias = v.narrow(0, d_out * d_in, d_out);
    const auto [tw, tb] = natgrad::linear_rows_tmv(x, g, w);
    expect_rows(u, natgrad::linear_gram(x, g, true), natgrad::linear_rows_mv(x, g, weight, bias), v,
                at::cat({tw.reshape({-1}), tb}), w);
    const at::Tensor uw = u.narrow(1, 0, d_out * d_in);
    EXPECT_TRUE(AllClose(natgrad::linear_gram(x, g, false), at::matmul(uw, uw.t()), kTol64));
  }
}

TEST(LayerGram, Conv2dRowsEqualUnfoldedPerSampleGradients) {
  at::manual_seed(701);
  const at::Tensor x = at::randn({3, 2, 7, 6}, at::kDouble);
  const std::vector<int64_t> kernel{3, 2}, stride{2, 1}, padding{1, 1}, dilation{1, 2};
  const at::Tensor patches =
      at::im2col(x, kernel, dilation, padding, stride).transpose(1, 2);  // [N, L, d_in]
  const int64_t positions = patches.size(1);
  const int64_t out_h = (7 + 2 - 3) / 2 + 1, out_w = (6 + 2 - 2 * 1 - 1) / 1 + 1;
  ASSERT_EQ(out_h * out_w, positions);
  const at::Tensor g = at::randn({6, 4, out_h, out_w}, at::kDouble);  // 2 passes
  const at::Tensor u =
      linear_rows_reference(patches, g.reshape({6, 4, positions}).transpose(1, 2), true);
  const at::Tensor v = at::randn({u.size(1)}, at::kDouble), w = at::randn({6}, at::kDouble);
  const at::Tensor weight = v.narrow(0, 0, 4 * 12).reshape({4, 2, 3, 2});
  const auto [tw, tb] = natgrad::conv2d_rows_tmv(x, g, w, kernel, stride, padding, dilation);
  expect_rows(u, natgrad::conv2d_gram(x, g, kernel, stride, padding, dilation, true),
              natgrad::conv2d_rows_mv(x, g, weight, v.narrow(0, 48, 4), stride, padding, dilation),
              v, at::cat({tw.reshape({-1}), tb}), w);
}

TEST(LayerGram, EmbeddingRowsEqualOneHotLinearRows) {
  at::manual_seed(702);
  const at::Tensor idx = at::randint(0, 4, {5, 3}, at::kLong);
  const at::Tensor g = at::randn({10, 3, 2}, at::kDouble);
  const at::Tensor onehot = at::one_hot(idx, 4).to(at::kDouble);
  // rows in the weight's [num_embeddings, dim] layout
  const at::Tensor u =
      linear_rows_reference(onehot, g, false).reshape({10, 2, 4}).transpose(1, 2).reshape({10, 8});
  const at::Tensor v = at::randn({8}, at::kDouble), w = at::randn({10}, at::kDouble);
  expect_rows(u, natgrad::embedding_gram(idx, g),
              natgrad::embedding_rows_mv(idx, g, v.reshape({4, 2})), v,
              natgrad::embedding_rows_tmv(idx, g, w, 4).reshape({-1}), w);
}

TEST(LayerGram, GramSolveEqualsTheDenseSolve) {
  at::manual_seed(703);
  const at::Tensor a = at::randn({5, 7}, at::kDouble);
  const at::Tensor gram = at::matmul(a, a.t()), rhs = at::randn({5, 2}, at::kDouble);
  const auto [x, rung] = natgrad::gram_solve(gram, rhs, 0.2);
  EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kNative));
  EXPECT_TRUE(AllClose(x, at::linalg_solve(gram + 0.2 * at::eye(5, at::kDouble), rhs), kTol64));
}

TEST(LayerGram, RejectsBadArgumentsNamingThem) {
  EXPECT_TRUE(ThrowsMentioning(
      [] {
        natgrad::linear_gram(at::randn({4, 3}), at::randn({5, 2}), true);
      },
      {"grad_output", "multiple"}));
  EXPECT_TRUE(ThrowsMentioning(
      [] {
        natgrad::linear_gram(at::randn({0, 3}), at::randn({0, 2}), true);
      },
      {"input", "empty batch"}));
  EXPECT_TRUE(ThrowsMentioning(
      [] {
        natgrad::embedding_rows_mv(at::tensor({0, 9}), at::randn({2, 3}), at::randn({4, 3}));
      },
      {"indices", "[0, 4)"}));
  EXPECT_TRUE(
      ThrowsMentioning([] { natgrad::gram_solve(at::eye(2), at::randn({2}), -1.0); }, {"shift"}));
}

class WoodburyLargeBatch : public natgrad_test::LadderTest {};

TEST_F(WoodburyLargeBatch, SolvesThePxPSystemAndReportsItsRung) {
  at::manual_seed(704);
  const at::Tensor u = at::randn({40, 6}, at::kDouble), rhs = at::randn({6, 2}, at::kDouble);
  const at::Tensor dense =
      at::linalg_solve(at::matmul(u.t(), u) / 40.0 + 0.1 * at::eye(6, at::kDouble), rhs);
  auto [x, rung] = natgrad::woodbury_solve(u, rhs, 0.1);
  EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kNative));
  EXPECT_TRUE(AllClose(x, dense, kTol64));
  natgrad::testing::force_ladder_failures(1);  // the p x p system is float64: next rung is jitter
  std::tie(x, rung) = natgrad::woodbury_solve(u.to(at::kFloat), rhs.to(at::kFloat), 0.1);
  EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kJitter));
  EXPECT_TRUE(AllClose(x, dense, natgrad_test::kTol32));
}

}  // namespace
