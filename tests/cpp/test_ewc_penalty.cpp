// The EWC penalty (ewc/ewc_penalty.h) against sum F (theta - anchor)^2 and 2 F (theta - anchor).
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "natgrad.h"
#include "test_helpers.h"

namespace {

using natgrad_test::AllClose;
using natgrad_test::kTol32;
using natgrad_test::kTol64;
using natgrad_test::ThrowsMentioning;
using natgrad_test::tol_for;

struct EwcLists {
  std::vector<at::Tensor> params, fisher, anchor;
};

// Several tensors of different shapes, some of them non-contiguous views.
EwcLists random_lists(at::ScalarType dtype) {
  EwcLists l;
  l.params = {at::randn({3, 4}, dtype), at::randn({5}, dtype),
              at::randn({4, 3, 2}, dtype).transpose(0, 2),  // [2, 3, 4] view
              at::randn({}, dtype), at::randn({6, 10}, dtype).slice(1, 0, 10, 3)};
  for (const at::Tensor& p : l.params) {
    l.fisher.push_back(at::rand(p.sizes(), dtype));
    l.anchor.push_back(at::randn(p.sizes(), dtype));
  }
  l.fisher[2] = at::rand({4, 3, 2}, dtype).permute({2, 1, 0});  // non-contiguous too
  l.anchor[4] = at::randn({12, 4}, dtype).slice(0, 0, 12, 2);   // [6, 4] view
  return l;
}

double ref_penalty(const EwcLists& l) {
  double total = 0.0;
  for (size_t t = 0; t < l.params.size(); ++t) {
    const at::Tensor diff = l.params[t].to(at::kDouble) - l.anchor[t].to(at::kDouble);
    total += (l.fisher[t].to(at::kDouble) * diff * diff).sum().item<double>();
  }
  return total;
}

at::Tensor ref_grad(const EwcLists& l, size_t t) {
  return 2.0 * l.fisher[t].to(at::kDouble) *
         (l.params[t].to(at::kDouble) - l.anchor[t].to(at::kDouble));
}

TEST(EwcPenalty, MatchesTheFormulaOverTensorsOfDifferentShapesAndLayouts) {
  at::manual_seed(400);
  for (auto dtype : {at::kDouble, at::kFloat}) {
    const EwcLists l = random_lists(dtype);
    ASSERT_FALSE(l.params[2].is_contiguous());
    ASSERT_FALSE(l.anchor[4].is_contiguous());
    const auto [penalty, grads] = natgrad::ewc_penalty(l.params, l.fisher, l.anchor);
    EXPECT_EQ(penalty.dim(), 0);
    EXPECT_EQ(penalty.scalar_type(), dtype);
    const double ref = ref_penalty(l);
    EXPECT_NEAR(penalty.item<double>(), ref, tol_for(dtype) * std::abs(ref));
    ASSERT_EQ(grads.size(), l.params.size());
    for (size_t t = 0; t < grads.size(); ++t) {
      EXPECT_EQ(grads[t].sizes(), l.params[t].sizes()) << t;
      EXPECT_EQ(grads[t].scalar_type(), dtype);
      EXPECT_TRUE(AllClose(grads[t], ref_grad(l, t), tol_for(dtype))) << "tensor " << t;
    }
  }
}

TEST(EwcPenalty, IsZeroAtTheAnchorAndScalesWithTheFisher) {
  at::manual_seed(401);
  const at::Tensor theta = at::randn({4, 4}, at::kDouble), f = at::rand({4, 4}, at::kDouble);
  auto [at_anchor, zero_grads] = natgrad::ewc_penalty({theta}, {f}, {theta.clone()});
  EXPECT_EQ(at_anchor.item<double>(), 0.0);
  EXPECT_TRUE(zero_grads[0].equal(at::zeros({4, 4}, at::kDouble)));
  const at::Tensor anchor = at::zeros({4, 4}, at::kDouble);
  const double once = std::get<0>(natgrad::ewc_penalty({theta}, {f}, {anchor})).item<double>();
  const double thrice =
      std::get<0>(natgrad::ewc_penalty({theta}, {f * 3.0}, {anchor})).item<double>();
  EXPECT_NEAR(thrice, 3.0 * once, kTol64 * thrice);
}

TEST(EwcPenalty, Float32AccumulatesAccurately) {
  // 2^22 terms of ~0.01 each: a float32 running sum would be off by percents; the op's float64
  // accumulation must agree with the float64 reference to float32 output rounding.
  at::manual_seed(402);
  const int64_t n = int64_t{1} << 22;
  const at::Tensor theta = at::full({n}, 0.1f) + at::rand({n}, at::kFloat) * 1e-3f;
  const at::Tensor anchor = at::zeros({n}, at::kFloat);
  const at::Tensor fisher = at::rand({n}, at::kFloat) + 0.5f;
  const auto [penalty, grads] = natgrad::ewc_penalty({theta}, {fisher}, {anchor});
  const double ref = (fisher.to(at::kDouble) * theta.to(at::kDouble).square()).sum().item<double>();
  EXPECT_NEAR(penalty.item<double>(), ref, 1e-6 * ref);
  EXPECT_TRUE(AllClose(grads[0], 2.0 * fisher.to(at::kDouble) * theta.to(at::kDouble), kTol32));
}

TEST(EwcPenalty, ReducedPrecisionDtypesUseTheFloatOpmath) {
  at::manual_seed(403);
  const at::Tensor theta = at::randn({64}, at::kBFloat16), f = at::rand({64}, at::kBFloat16);
  const at::Tensor anchor = at::randn({64}, at::kBFloat16);
  const auto [penalty, grads] = natgrad::ewc_penalty({theta}, {f}, {anchor});
  EXPECT_EQ(penalty.scalar_type(), at::kBFloat16);
  const at::Tensor diff = theta.to(at::kDouble) - anchor.to(at::kDouble);
  const double ref = (f.to(at::kDouble) * diff * diff).sum().item<double>();
  EXPECT_NEAR(penalty.item<double>(), ref, 1e-2 * ref);
  EXPECT_TRUE(AllClose(grads[0], 2.0 * f.to(at::kDouble) * diff, 1e-2));
}

TEST(EwcPenalty, WorksThroughTheDispatcher) {
  at::manual_seed(404);
  const EwcLists l = random_lists(at::kDouble);
  using Sig = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, at::TensorList,
                                                              at::TensorList);
  const auto [penalty, grads] = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("natgrad::ewc_penalty", "")
                                    .typed<Sig>()
                                    .call(l.params, l.fisher, l.anchor);
  EXPECT_NEAR(penalty.item<double>(), ref_penalty(l), kTol64 * std::abs(ref_penalty(l)));
  EXPECT_TRUE(AllClose(grads[1], ref_grad(l, 1), kTol64));
}

TEST(EwcPenaltyErrors, RejectsMismatchedListsShapesAndDtypesNamingThem) {
  const at::Tensor a = at::randn({3}), b = at::randn({2, 2});
  EXPECT_TRUE(ThrowsMentioning([] { natgrad::ewc_penalty({}, {}, {}); }, {"params"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::ewc_penalty({a, b}, {a}, {a, b});
      },
      {"fisher", "one tensor per parameter"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::ewc_penalty({a, b}, {a, b}, {a, b, a});
      },
      {"anchor", "one tensor per parameter"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::ewc_penalty({a, b}, {a, a}, {a, b});
      },
      {"fisher[1]", "shape"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::ewc_penalty({a, b}, {a, b}, {a.t(), b.t().reshape({4})});
      },
      {"anchor[1]", "shape"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::ewc_penalty({a, b}, {a, b}, {a.to(at::kDouble), b});
      },
      {"anchor[0]", "dtype"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] { natgrad::ewc_penalty({a.to(at::kLong)}, {a.to(at::kLong)}, {a.to(at::kLong)}); },
      {"params[0]", "floating"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::ewc_penalty({a, b.to(at::kInt)}, {a, b}, {a, b});
      },
      {"params[1]", "dtype"}));
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::ewc_penalty({a}, {at::Tensor()}, {a}); },
                               {"fisher[0]", "defined"}));
}

TEST(EwcPenalty, CompositionForOtherDevicesMatchesTheFusedCpuLoop) {
  at::manual_seed(405);
  for (at::ScalarType dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
    const EwcLists l = random_lists(dtype);
    const auto [fused, fused_grads] = natgrad::ewc_penalty(l.params, l.fisher, l.anchor);
    const auto [comp, comp_grads] = natgrad::ewc_penalty_composite(l.params, l.fisher, l.anchor);
    EXPECT_EQ(comp.scalar_type(), dtype);
    EXPECT_NEAR(comp.item<double>(), fused.item<double>(),
                (dtype == at::kBFloat16 ? 1e-2 : tol_for(dtype)) * std::abs(fused.item<double>()));
    ASSERT_EQ(comp_grads.size(), fused_grads.size());
    for (size_t t = 0; t < comp_grads.size(); ++t) {
      EXPECT_TRUE(comp_grads[t].is_contiguous());
      EXPECT_TRUE(
          AllClose(comp_grads[t], fused_grads[t], dtype == at::kBFloat16 ? 1e-2 : tol_for(dtype)));
    }
  }
}

}  // namespace
