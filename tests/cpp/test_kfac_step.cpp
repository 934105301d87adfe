// The per-step list ops (precondition/kfac_step.h) against dense float64 solves of each layer's
// Kronecker-factored system, and the subnormal helpers (common/subnormal.h).
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "natgrad.h"
#include "test_helpers.h"

namespace {

using natgrad_test::AllClose;
using natgrad_test::random_spd;
using natgrad_test::ThrowsMentioning;

// (A (x) G + damping I)^-1 vec(W~) for the packed [W, b], column-stacking vec.
at::Tensor dense_solve(const at::Tensor& packed, const at::Tensor& g, const at::Tensor& a,
                       double damping) {
  const int64_t m = packed.size(0), n = packed.size(1);
  const at::Tensor k = at::kron(a, g) + at::eye(m * n, at::kDouble) * damping;
  return natgrad_test::unvec_columns(at::linalg_solve(k, natgrad_test::vec_columns(packed)), m, n);
}

struct Layer {
  at::Tensor g, a, w;
  std::optional<at::Tensor> b;
  at::Tensor packed() const { return b.has_value() ? at::cat({w, b->unsqueeze(1)}, 1) : w; }
};

std::vector<Layer> make_layers() {
  std::vector<Layer> out;
  for (auto [m, n, bias] : {std::tuple{3, 4, true}, std::tuple{5, 2, false}}) {
    Layer l{random_spd(m), random_spd(n + (bias ? 1 : 0)), at::randn({m, n}, at::kDouble),
            std::nullopt};
    if (bias) l.b = at::randn({m}, at::kDouble);
    out.push_back(l);
  }
  return out;
}

c10::List<std::optional<at::Tensor>> bias_list(const std::vector<Layer>& ls) {
  c10::List<std::optional<at::Tensor>> out;
  for (const Layer& l : ls) out.push_back(l.b);
  return out;
}

TEST(KfacDirections, EigenEqualsDenseSolvePerLayer) {
  at::manual_seed(0);
  const auto ls = make_layers();
  std::vector<at::Tensor> w, lg, vg, la, va;
  for (const Layer& l : ls) {
    auto eg = natgrad::damped_eigh(l.g, 0.0);
    auto ea = natgrad::damped_eigh(l.a, 0.0);
    w.push_back(l.w);
    lg.push_back(eg.eigenvalues);
    vg.push_back(eg.eigenvectors);
    la.push_back(ea.eigenvalues);
    va.push_back(ea.eigenvectors);
  }
  const std::vector<double> damping{0.1, 0.01};
  auto out = natgrad::kfac_directions_eigen(w, bias_list(ls), lg, vg, la, va, damping, false, 0.5);
  ASSERT_EQ(out.weight.size(), 2u);
  ASSERT_EQ(out.bias.size(), 1u);
  for (size_t i = 0; i < ls.size(); ++i) {
    const at::Tensor ref = dense_solve(ls[i].packed(), ls[i].g, ls[i].a, damping[i]) * 0.5;
    const int64_t n = ls[i].w.size(1);
    EXPECT_TRUE(AllClose(out.weight[i], ref.narrow(1, 0, n), 1e-9));
    const double vg_w = (ref.narrow(1, 0, n) * ls[i].w).sum().item<double>() * 0.5;
    EXPECT_NEAR(out.stats[i][2].item<double>(), vg_w, 1e-9);
    EXPECT_EQ(out.stats[i][0].item<double>(), 1.0);
    EXPECT_EQ(out.stats[i][1].item<double>(), 1.0);
    if (ls[i].b.has_value()) {
      EXPECT_TRUE(AllClose(out.bias[0], ref.select(1, n), 1e-9));
    }
  }
}

TEST(KfacDirections, InverseEqualsDampedInversesProduct) {
  at::manual_seed(1);
  const auto ls = make_layers();
  std::vector<at::Tensor> w, gi, ai;
  for (const Layer& l : ls) {
    auto [g_inv, a_inv, rung] = natgrad::kfac_damped_inverses(l.g, l.a, 0.04, false);
    w.push_back(l.w);
    gi.push_back(g_inv);
    ai.push_back(a_inv);
  }
  auto out = natgrad::kfac_directions_inverse(w, bias_list(ls), gi, ai, 1.0);
  for (size_t i = 0; i < ls.size(); ++i) {
    const at::Tensor ref =
        at::linalg_solve(ls[i].g + 0.2 * at::eye(ls[i].g.size(0), at::kDouble), ls[i].packed())
            .mm(at::linalg_inv(ls[i].a + 0.2 * at::eye(ls[i].a.size(0), at::kDouble)));
    const int64_t n = ls[i].w.size(1);
    EXPECT_TRUE(AllClose(out.weight[i], ref.narrow(1, 0, n), 1e-9));
    if (ls[i].b.has_value()) EXPECT_TRUE(AllClose(out.bias[0], ref.select(1, n), 1e-9));
  }
}

TEST(KfacDirections, NonFiniteGradientIsFlaggedAndLengthsAreChecked) {
  at::manual_seed(2);
  auto ls = make_layers();
  ls[1].w[0][0] = std::numeric_limits<double>::quiet_NaN();
  std::vector<at::Tensor> w{ls[0].w, ls[1].w}, gi{ls[0].g, ls[1].g}, ai{ls[0].a, ls[1].a};
  auto out = natgrad::kfac_directions_inverse(w, bias_list(ls), gi, ai, 1.0);
  EXPECT_EQ(out.stats[0][0].item<double>(), 1.0);
  EXPECT_EQ(out.stats[1][0].item<double>(), 0.0);
  EXPECT_EQ(out.stats[1][1].item<double>(), 0.0);
  std::vector<at::Tensor> one{ls[0].g};
  EXPECT_TRUE(
      ThrowsMentioning([&] { natgrad::kfac_directions_inverse(w, bias_list(ls), one, ai, 1.0); },
                       {"g_inverses", "one entry per layer"}));
}

TEST(KfacDirections, MomentumBuffersAppendTheirInnerProductsWithTheGradient) {
  at::manual_seed(3);
  const auto ls = make_layers();
  std::vector<at::Tensor> w, gi, ai;
  for (const Layer& l : ls) {
    auto [g_inv, a_inv, rung] = natgrad::kfac_damped_inverses(l.g, l.a, 0.04, false);
    w.push_back(l.w);
    gi.push_back(g_inv);
    ai.push_back(a_inv);
  }
  const at::Tensor bw0 = at::randn_like(ls[0].w), bb0 = at::randn_like(*ls[0].b);
  const at::Tensor bw1 = at::randn_like(ls[1].w);
  natgrad::OptionalTensors weight_buffers, bias_buffers;
  weight_buffers.push_back(bw0);
  weight_buffers.push_back(bw1);
  bias_buffers.push_back(bb0);
  bias_buffers.push_back(std::nullopt);
  const auto plain = natgrad::kfac_directions_inverse(w, bias_list(ls), gi, ai, 0.5);
  const auto out =
      natgrad::kfac_directions_inverse(w, bias_list(ls), gi, ai, 0.5, weight_buffers, bias_buffers);
  ASSERT_EQ(plain.stats.sizes(), (std::vector<int64_t>{2, 4}));
  ASSERT_EQ(out.stats.sizes(), (std::vector<int64_t>{2, 6}));
  EXPECT_TRUE(at::equal(out.stats.narrow(1, 0, 4), plain.stats));
  // <b, s g> in float64, 0 where a layer has no buffer
  EXPECT_NEAR(out.stats[0][4].item<double>(), (bw0 * ls[0].w).sum().item<double>() * 0.5, 1e-12);
  EXPECT_NEAR(out.stats[0][5].item<double>(), (bb0 * *ls[0].b).sum().item<double>() * 0.5, 1e-12);
  EXPECT_NEAR(out.stats[1][4].item<double>(), (bw1 * ls[1].w).sum().item<double>() * 0.5, 1e-12);
  EXPECT_EQ(out.stats[1][5].item<double>(), 0.0);
  // <u, g> of the fused pass equals the float64 formula
  EXPECT_NEAR(out.stats[1][2].item<double>(), (out.weight[1] * ls[1].w).sum().item<double>() * 0.5,
              1e-12);
  natgrad::OptionalTensors bad;
  bad.push_back(bw1);  // layer 0's buffer must be [3, 4]
  bad.push_back(std::nullopt);
  EXPECT_TRUE(ThrowsMentioning(
      [&] { natgrad::kfac_directions_inverse(w, bias_list(ls), gi, ai, 1.0, bad); },
      {"weight_buffers[0]", "shape"}));
}

TEST(KfacMomentum, MatchesHeavyBallAndFlushesBuffers) {
  at::Tensor p = at::ones({4}, at::kFloat), buf = at::full({4}, 1e-37, at::kFloat);
  at::Tensor u = at::full({4}, 2.0, at::kFloat);
  std::vector<at::Tensor> ps{p}, bs{buf}, us{u};
  natgrad::kfac_momentum_step_(ps, bs, us, 0.5, 0.5, 0.1, 1.0);
  // b = 0.5 * 1e-37 + (2 + 0.1 * 1), p = 1 - 0.5 * b
  EXPECT_TRUE(AllClose(buf, at::full({4}, 2.1, at::kFloat), 1e-6));
  EXPECT_TRUE(AllClose(p, at::full({4}, 1.0 - 1.05, at::kFloat), 1e-6));
  at::Tensor tiny = at::full({4}, 1e-37, at::kFloat), zero = at::zeros({4}, at::kFloat);
  std::vector<at::Tensor> ps2{zero.clone()}, bs2{tiny}, us2{zero};
  natgrad::kfac_momentum_step_(ps2, bs2, us2, 0.1, 0.01, 0.0, 1.0);  // 1e-39: subnormal
  EXPECT_TRUE(at::equal(tiny, zero));
}

TEST(Subnormal, FlushZeroesOnlySubnormals) {
  const float tiny = std::numeric_limits<float>::min();
  at::Tensor t =
      at::tensor({tiny / 4, -tiny / 2, tiny, -1.0f, 0.0f, std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::quiet_NaN()});
  EXPECT_TRUE(natgrad::has_subnormal(t));
  natgrad::flush_subnormal_(t);
  EXPECT_FALSE(natgrad::has_subnormal(t));
  EXPECT_EQ(t[0].item<float>(), 0.0f);
  EXPECT_EQ(t[1].item<float>(), 0.0f);
  EXPECT_EQ(t[2].item<float>(), tiny);
  EXPECT_EQ(t[3].item<float>(), -1.0f);
  EXPECT_TRUE(std::isinf(t[5].item<float>()));
  EXPECT_TRUE(std::isnan(t[6].item<float>()));
  at::Tensor strided = at::full({4, 4}, 1e-40, at::kDouble).t().to(at::kFloat).t();
  natgrad::flush_subnormal_(strided);  // the generic path
  EXPECT_EQ(strided.abs().max().item<float>(), 0.0f);
}

TEST(Subnormal, WithoutSubnormalsCopiesOnlyWhenNeeded) {
  const at::Tensor clean = at::randn({8, 8});
  EXPECT_TRUE(natgrad::without_subnormals(clean).is_same(clean));
  at::Tensor dirty = clean.clone();
  dirty[3][4] = 1e-40f;
  const at::Tensor flushed = natgrad::without_subnormals(dirty);
  EXPECT_FALSE(flushed.is_same(dirty));
  EXPECT_EQ(flushed[3][4].item<float>(), 0.0f);
  EXPECT_GT(std::abs(dirty[3][4].item<float>()), 0.0f);  // the input is left alone
  flushed[3][4] = clean[3][4];
  EXPECT_TRUE(at::equal(flushed, clean));
}

}  // namespace
