// natgrad::likelihood: the rules both frontends share, against references written here.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "likelihood/likelihood.h"

namespace lk = natgrad::likelihood;

TEST(Likelihood, PerSampleNllSumsEachSamplesPositions) {
  const at::Tensor logits = at::randn({4, 3, 5}, at::kDouble);
  const at::Tensor labels = at::randint(5, {4, 3}, at::kLong);
  const at::Tensor expected =
      -at::log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(1);
  EXPECT_TRUE(at::allclose(lk::per_sample_nll("categorical", logits, labels), expected, 0, 1e-12));
  const at::Tensor mean = at::randn({4, 2}, at::kDouble), y = at::randn({4, 2}, at::kDouble);
  EXPECT_TRUE(at::allclose(lk::per_sample_nll("gaussian", mean, y),
                           0.5 * (y - mean).pow(2).sum(1), 0, 1e-12));
}

TEST(Likelihood, ExactCategoricalPassesWeighOneHotLabelsBySqrtP) {
  const at::Tensor logits = at::randn({5, 4}, at::kDouble);
  const lk::Passes p = lk::pseudo_targets("categorical", logits, "exact", std::nullopt, 1);
  ASSERT_EQ(p.targets.size(), 4u);
  // Σ_c w_c² (p − e_c)(p − e_c)ᵀ = diag(p) − p pᵀ per sample.
  const at::Tensor probs = at::softmax(logits, -1);
  at::Tensor fisher = at::zeros({5, 4, 4}, at::kDouble);
  for (int64_t c = 0; c < 4; ++c) {
    EXPECT_TRUE(at::equal(p.targets[c], at::full({5}, c, at::kLong)));
    const at::Tensor g = probs - at::one_hot(p.targets[c], 4).to(at::kDouble);
    const at::Tensor w2 = p.weights[c].pow(2).view({5, 1, 1});
    fisher += w2 * g.unsqueeze(2) * g.unsqueeze(1);
  }
  const at::Tensor expected = at::diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1);
  EXPECT_TRUE(at::allclose(fisher, expected, 0, 1e-12));
}

TEST(Likelihood, ExactBernoulliPassesGiveDiagonalPTimesOneMinusP) {
  const at::Tensor logits = at::randn({5, 3}, at::kDouble);
  const at::Tensor y = at::rand({5, 3}, at::kDouble);
  const at::Tensor probs = at::sigmoid(logits);
  EXPECT_TRUE(at::allclose(lk::per_sample_nll("bernoulli", logits, y),
                           -(y * probs.log() + (1 - y) * (-probs).log1p()).sum(1), 0, 1e-12));
  const lk::Passes p = lk::pseudo_targets("bernoulli", logits, "exact", std::nullopt, 1);
  ASSERT_EQ(p.targets.size(), 3u);
  EXPECT_FALSE(p.weights.defined());
  // The gradient of the NLL w.r.t. the logits is p - target: sum_k r_k r_k^T = diag(p (1 - p)).
  at::Tensor fisher = at::zeros({5, 3, 3}, at::kDouble);
  for (const at::Tensor& target : p.targets) {
    const at::Tensor r = probs - target;
    fisher += r.unsqueeze(2) * r.unsqueeze(1);
  }
  EXPECT_TRUE(at::allclose(fisher, at::diag_embed(probs * (1 - probs)), 0, 1e-12));
}

TEST(Likelihood, McPassesAreSeededDrawsWeightedOneOverSqrtDraws) {
  const at::Tensor logits = at::randn({6, 3});
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  const lk::Passes p = lk::pseudo_targets("categorical", logits, "mc", std::nullopt, 2, gen);
  auto ref = at::make_generator<at::CPUGeneratorImpl>(11);
  for (const auto& labels : p.targets) {
    EXPECT_TRUE(at::equal(labels, at::multinomial(at::softmax(logits, -1), 1, false, ref).view({6})));
  }
  EXPECT_TRUE(at::allclose(p.weights, at::full({2, 6}, 1.0 / std::sqrt(2.0)), 0, 0));
  EXPECT_FALSE(lk::pseudo_targets("categorical", logits, "mc", std::nullopt, 1).weights.defined());
}

TEST(Likelihood, BadTargetsAndChoicesThrowNamingWhatWasExpected) {
  const at::Tensor logits = at::randn({3, 4});
  EXPECT_THROW(lk::check_targets("categorical", logits, at::randn({3})), c10::ValueError);
  EXPECT_THROW(lk::check_targets("categorical", logits, at::full({3}, 4, at::kLong)),
               c10::ValueError);
  EXPECT_THROW(lk::check_targets("gaussian", at::randn({10, 1}), at::randn({10})),
               c10::ValueError);
  EXPECT_THROW(lk::check_name("poisson"), c10::ValueError);
  EXPECT_THROW(lk::pseudo_targets("categorical", logits, "true", std::nullopt, 1),
               c10::ValueError);
  EXPECT_THROW(lk::pseudo_targets("categorical", logits, "mc", std::nullopt, 0), c10::ValueError);
  EXPECT_THROW(lk::pseudo_targets("categorical", logits, "empirical", std::nullopt, 1),
               c10::ValueError);
}
