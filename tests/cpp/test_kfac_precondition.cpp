// K-FAC preconditioning (precondition/kfac_precondition.h) against dense float64 solves of the
// Kronecker-factored system.
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
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
using natgrad_test::random_psd_rank;
using natgrad_test::random_spd;
using natgrad_test::ThrowsMentioning;
using natgrad_test::tol_for;

class KfacInverses : public natgrad_test::LadderTest {};

// ---- Reference formulas ---------------------------------------------------------------------

// (A (x) G + damping I)^-1 vec(dW), column-stacking vec, as a dense (mn x mn) solve.
at::Tensor ref_kron_solve(const at::Tensor& dw, const at::Tensor& g, const at::Tensor& a,
                          double damping) {
  const int64_t m = dw.size(0), n = dw.size(1);
  const at::Tensor k =
      at::kron(a.to(at::kDouble), g.to(at::kDouble)) + at::eye(m * n, at::kDouble) * damping;
  const at::Tensor x = at::linalg_solve(k, natgrad_test::vec_columns(dw.to(at::kDouble)));
  return natgrad_test::unvec_columns(x, m, n);
}

double ref_pi(const at::Tensor& g, const at::Tensor& a) {
  const double tg = g.to(at::kDouble).trace().item<double>() / static_cast<double>(g.size(0));
  const double ta = a.to(at::kDouble).trace().item<double>() / static_cast<double>(a.size(0));
  return (tg > 0 && ta > 0) ? std::sqrt(ta / tg) : 1.0;
}

// (G + sqrt(damping) / pi I)^-1 dW (A + pi sqrt(damping) I)^-1 by two dense solves (Martens &
// Grosse 2015, sec. 6.3: the activation factor A takes pi sqrt(damping)).
at::Tensor ref_factored(const at::Tensor& dw, const at::Tensor& g, const at::Tensor& a,
                        double damping, double pi) {
  const double root = std::sqrt(damping);
  const at::Tensor gd = g.to(at::kDouble) + at::eye(g.size(0), at::kDouble) * (root / pi);
  const at::Tensor ad = a.to(at::kDouble) + at::eye(a.size(0), at::kDouble) * (pi * root);
  const at::Tensor left = at::linalg_solve(gd, dw.to(at::kDouble));
  return at::linalg_solve(ad, left.t()).t();  // X Ad^-1 = (Ad^-1 X^T)^T, Ad symmetric
}

// Plain ATen eigenpairs (not natgrad's damped_eigh) in `dtype`.
std::pair<at::Tensor, at::Tensor> eig(const at::Tensor& f, at::ScalarType dtype) {
  auto [w, v] = at::linalg_eigh(f.to(at::kDouble));
  return {w.to(dtype), v.to(dtype)};
}

at::Tensor precondition_eigen(const at::Tensor& dw, const at::Tensor& g, const at::Tensor& a,
                              double damping, bool pi_correction) {
  const auto [gw, gv] = eig(g, dw.scalar_type());
  const auto [aw, av] = eig(a, dw.scalar_type());
  return natgrad::kfac_precondition_eigen(dw, gw, gv, aw, av, damping, pi_correction);
}

// ---- Eigenbasis form ------------------------------------------------------------------------

TEST(KfacPrecondition, ReferenceVecOrderingSatisfiesKroneckerIdentity) {
  at::manual_seed(200);
  const at::Tensor g = random_spd(3), a = random_spd(4), w = at::randn({3, 4}, at::kDouble);
  EXPECT_TRUE(AllClose(at::matmul(at::kron(a, g), natgrad_test::vec_columns(w)),
                       natgrad_test::vec_columns(at::matmul(at::matmul(g, w), a)), kTol64));
}

TEST(KfacPrecondition, EigenFormEqualsTheDenseKroneckerSolve) {
  at::manual_seed(201);
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{3, 5}, {1, 1}, {6, 2}}) {
    const at::Tensor g = random_spd(m), a = random_spd(n);
    const at::Tensor dw = at::randn({m, n}, at::kDouble);
    for (double damping : {0.0, 0.1, 3.0}) {
      EXPECT_TRUE(AllClose(precondition_eigen(dw, g, a, damping, false),
                           ref_kron_solve(dw, g, a, damping), kTol64))
          << m << "x" << n << " damping " << damping;
    }
  }
}

TEST(KfacPrecondition, EigenFormHandlesRankDeficientFactorsAndNonContiguousGradients) {
  at::manual_seed(202);
  const at::Tensor g = random_psd_rank(4, 2), a = random_psd_rank(7, 3);  // batch < dimension
  const at::Tensor dw = at::randn({7, 4}, at::kDouble).t();
  ASSERT_FALSE(dw.is_contiguous());
  EXPECT_TRUE(
      AllClose(precondition_eigen(dw, g, a, 0.05, false), ref_kron_solve(dw, g, a, 0.05), kTol64));
}

TEST(KfacPrecondition, EigenFormMatchesInFloat32) {
  at::manual_seed(203);
  const at::Tensor g = random_spd(5), a = random_spd(6);
  const at::Tensor dw = at::randn({5, 6}, at::kFloat);
  const at::Tensor p = precondition_eigen(dw, g, a, 0.2, false);
  EXPECT_EQ(p.scalar_type(), at::kFloat);
  EXPECT_TRUE(AllClose(p, ref_kron_solve(dw, g, a, 0.2), kTol32));
}

TEST(KfacPrecondition, EigenFormFromDampedEighEqualsTheDenseSolve) {
  at::manual_seed(204);
  const at::Tensor g = random_psd_rank(4, 6), a = random_psd_rank(5, 3);
  const at::Tensor dw = at::randn({4, 5}, at::kDouble);
  const natgrad::EighResult ge = natgrad::damped_eigh(g, 0.0), ae = natgrad::damped_eigh(a, 0.0);
  const at::Tensor p = natgrad::kfac_precondition_eigen(
      dw, ge.eigenvalues, ge.eigenvectors, ae.eigenvalues, ae.eigenvectors, 0.1, false);
  EXPECT_TRUE(AllClose(p, ref_kron_solve(dw, g, a, 0.1), kTol64));
}

TEST(KfacPrecondition, ZeroDenominatorLeavesThatDirectionUnscaled) {
  // G = diag(0, 2), A = diag(1, 4), no damping: the first row has no curvature.
  const at::Tensor gw = at::tensor({0.0, 2.0}, at::kDouble),
                   aw = at::tensor({1.0, 4.0}, at::kDouble);
  const at::Tensor eye = at::eye(2, at::kDouble);
  const at::Tensor dw = at::tensor({1.0, 2.0, 3.0, 4.0}, at::kDouble).reshape({2, 2});
  const at::Tensor p = natgrad::kfac_precondition_eigen(dw, gw, eye, aw, eye, 0.0, false);
  const at::Tensor expected =
      at::tensor({1.0, 2.0, 3.0 / 2.0, 4.0 / 8.0}, at::kDouble).reshape({2, 2});
  EXPECT_TRUE(AllClose(p, expected, kTol64));
}

TEST(KfacPrecondition, PiCorrectedEigenFormEqualsFactoredDampingAndTheInverseForm) {
  at::manual_seed(205);
  for (auto dtype : {at::kDouble, at::kFloat}) {
    // Factors of very different scales, so pi is far from 1.
    const at::Tensor g = random_spd(4) * 50.0, a = random_psd_rank(6, 3) * 0.02;
    const at::Tensor dw = at::randn({4, 6}, dtype);
    const double damping = 0.01, pi = ref_pi(g, a);
    ASSERT_LT(pi, 0.1);
    const at::Tensor expected = ref_factored(dw, g, a, damping, pi);
    EXPECT_TRUE(AllClose(precondition_eigen(dw, g, a, damping, true), expected, tol_for(dtype)));

    const auto [g_inv, a_inv, rung] =
        natgrad::kfac_damped_inverses(g.to(dtype), a.to(dtype), damping, true);
    EXPECT_EQ(rung.item<int64_t>(), 0);
    EXPECT_EQ(g_inv.scalar_type(), dtype);
    EXPECT_TRUE(
        AllClose(natgrad::kfac_precondition_inverse(dw, g_inv, a_inv), expected, tol_for(dtype)));
  }
}

TEST(KfacPrecondition, BatchedLayersEqualPerLayerResults) {
  at::manual_seed(206);
  const int64_t layers = 3, m = 3, n = 4;
  std::vector<at::Tensor> gs, as;
  for (int64_t l = 0; l < layers; ++l) {
    gs.push_back(random_spd(m) * static_cast<double>(l + 1));
    as.push_back(random_psd_rank(n, 2 + l));
  }
  const at::Tensor g = at::stack(gs), a = at::stack(as);
  const at::Tensor dw = at::randn({layers, m, n}, at::kDouble);
  auto [gw, gv] = at::linalg_eigh(g);
  auto [aw, av] = at::linalg_eigh(a);
  for (bool pi_correction : {false, true}) {
    const at::Tensor eigen =
        natgrad::kfac_precondition_eigen(dw, gw, gv, aw, av, 0.1, pi_correction);
    const auto [g_inv, a_inv, rung] = natgrad::kfac_damped_inverses(g, a, 0.1, pi_correction);
    const at::Tensor inverse = natgrad::kfac_precondition_inverse(dw, g_inv, a_inv);
    for (int64_t l = 0; l < layers; ++l) {
      const double pi = pi_correction ? ref_pi(gs[l], as[l]) : 1.0;
      const at::Tensor expected = ref_factored(dw[l], gs[l], as[l], 0.1, pi);
      EXPECT_TRUE(AllClose(inverse[l], expected, kTol64)) << "layer " << l;
      if (pi_correction) {
        EXPECT_TRUE(AllClose(eigen[l], expected, kTol64)) << "layer " << l;
      } else {
        EXPECT_TRUE(AllClose(eigen[l], ref_kron_solve(dw[l], gs[l], as[l], 0.1), kTol64));
      }
    }
  }
  // Two leading dims behave like one.
  const at::Tensor g4 = g.unsqueeze(0).expand({2, layers, m, m}).contiguous();
  const at::Tensor a4 = a.unsqueeze(0).expand({2, layers, n, n}).contiguous();
  const auto [g_inv4, a_inv4, rung4] = natgrad::kfac_damped_inverses(g4, a4, 0.1, true);
  const at::Tensor dw4 = at::stack({dw, dw});
  const at::Tensor p4 = natgrad::kfac_precondition_inverse(dw4, g_inv4, a_inv4);
  EXPECT_TRUE(
      AllClose(p4[1][2], ref_factored(dw[2], gs[2], as[2], 0.1, ref_pi(gs[2], as[2])), kTol64));
}

// ---- Damped inverses ------------------------------------------------------------------------

TEST_F(KfacInverses, MatchExplicitInversesAndKeepTheFactorDtype) {
  at::manual_seed(207);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const at::Tensor g = random_spd(4).to(dtype), a = random_psd_rank(5, 2).to(dtype);
    const auto [g_inv, a_inv, rung] = natgrad::kfac_damped_inverses(g, a, 0.04, false);
    EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kNative));
    EXPECT_EQ(g_inv.scalar_type(), dtype);
    EXPECT_EQ(a_inv.scalar_type(), dtype);
    EXPECT_TRUE(AllClose(g_inv, at::linalg_inv(g.to(at::kDouble) + at::eye(4, at::kDouble) * 0.2),
                         tol_for(dtype)));
    EXPECT_TRUE(AllClose(a_inv, at::linalg_inv(a.to(at::kDouble) + at::eye(5, at::kDouble) * 0.2),
                         tol_for(dtype)));
  }
}

TEST_F(KfacInverses, PiIsOneWhenAFactorHasZeroTrace) {
  at::manual_seed(208);
  const at::Tensor g = at::zeros({3, 3}, at::kDouble), a = random_spd(2);
  const at::Tensor dw = at::randn({3, 2}, at::kDouble);
  const auto [g_inv, a_inv, rung] = natgrad::kfac_damped_inverses(g, a, 0.25, true);
  EXPECT_TRUE(AllClose(g_inv, at::eye(3, at::kDouble) * 2.0, kTol64));  // (0 + 0.5 I)^-1
  const at::Tensor expected = ref_factored(dw, g, a, 0.25, 1.0);
  EXPECT_TRUE(AllClose(natgrad::kfac_precondition_inverse(dw, g_inv, a_inv), expected, kTol64));
  EXPECT_TRUE(AllClose(precondition_eigen(dw, g, a, 0.25, true), expected, kTol64));
}

TEST_F(KfacInverses, ForcedFailuresAreReportedAsTheWorstRung) {
  at::manual_seed(209);
  const at::Tensor g = random_spd(4).to(at::kFloat), a = random_spd(3).to(at::kFloat);
  const at::Tensor g_ref = at::linalg_inv(g.to(at::kDouble) + at::eye(4, at::kDouble) * 0.1);
  const at::Tensor a_ref = at::linalg_inv(a.to(at::kDouble) + at::eye(3, at::kDouble) * 0.1);

  force_ladder_failures(2);  // G's solve: native and float64 fail, first jitter succeeds
  auto [g_inv, a_inv, rung] = natgrad::kfac_damped_inverses(g, a, 0.01, false);
  EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kJitter));
  EXPECT_TRUE(AllClose(g_inv, g_ref, kTol32));
  EXPECT_TRUE(AllClose(a_inv, a_ref, kTol32));

  force_ladder_failures(2 + natgrad::kJitterSteps);  // G's solve falls back to its diagonal
  std::tie(g_inv, a_inv, rung) = natgrad::kfac_damped_inverses(g, a, 0.01, false);
  EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kDiagonal));
  EXPECT_EQ(g_inv.scalar_type(), at::kFloat);
  EXPECT_TRUE(AllClose(g_inv, at::diag(1.0 / (g.to(at::kDouble).diagonal() + 0.1)), kTol32));
  EXPECT_TRUE(AllClose(a_inv, a_ref, kTol32));  // A's own solve was not forced
}

TEST_F(KfacInverses, IllConditionedFloat32FactorsGiveFiniteOutput) {
  at::manual_seed(210);
  const at::Tensor q = std::get<0>(at::linalg_qr(at::randn({6, 6}, at::kDouble)));
  const at::Tensor f =
      at::matmul(q * at::logspace(-12, 0, 6, 10.0, at::kDouble), q.t()).to(at::kFloat);
  const auto [g_inv, a_inv, rung] = natgrad::kfac_damped_inverses(f, f, 1e-14, false);
  EXPECT_TRUE(AllFinite(g_inv));
  EXPECT_TRUE(AllFinite(a_inv));
  const at::Tensor p = natgrad::kfac_precondition_inverse(at::randn({6, 6}), g_inv, a_inv);
  EXPECT_TRUE(AllFinite(p));
}

// ---- Argument errors ------------------------------------------------------------------------

TEST(KfacPreconditionErrors, EigenFormRejectsBadArgumentsNamingThem) {
  const at::Tensor dw = at::randn({3, 4}, at::kDouble);
  const at::Tensor gw = at::ones({3}, at::kDouble), gv = at::eye(3, at::kDouble);
  const at::Tensor aw = at::ones({4}, at::kDouble), av = at::eye(4, at::kDouble);
  auto eigen = [](const at::Tensor& d, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& c, const at::Tensor& e, double damping) {
    return [=] { natgrad::kfac_precondition_eigen(d, a, b, c, e, damping, false); };
  };
  EXPECT_TRUE(ThrowsMentioning(eigen(at::randn({4}, at::kDouble), gw, gv, aw, av, 0.1), {"grad"}));
  EXPECT_TRUE(ThrowsMentioning(eigen(dw.to(at::kLong), gw, gv, aw, av, 0.1), {"grad", "floating"}));
  EXPECT_TRUE(ThrowsMentioning(eigen(dw, gw, at::eye(4, at::kDouble), aw, av, 0.1),
                               {"g_eigenvectors", "shape"}));
  EXPECT_TRUE(ThrowsMentioning(eigen(dw, gw, gv, aw, av.t().slice(0, 0, 3), 0.1),
                               {"a_eigenvectors", "shape"}));
  EXPECT_TRUE(ThrowsMentioning(eigen(dw, gw, gv, at::ones({3}, at::kDouble), av, 0.1),
                               {"a_eigenvalues", "shape"}));
  EXPECT_TRUE(
      ThrowsMentioning(eigen(dw, gw.to(at::kFloat), gv, aw, av, 0.1), {"g_eigenvalues", "dtype"}));
  EXPECT_TRUE(
      ThrowsMentioning(eigen(dw, gw, gv.to(at::kFloat), aw, av, 0.1), {"g_eigenvectors", "dtype"}));
  for (double damping : {-1.0, std::numeric_limits<double>::quiet_NaN()}) {
    EXPECT_TRUE(ThrowsMentioning(eigen(dw, gw, gv, aw, av, damping), {"damping"}));
  }
}

TEST(KfacPreconditionErrors, InverseFormsRejectBadArgumentsNamingThem) {
  const at::Tensor g = at::eye(3, at::kDouble), a = at::eye(4, at::kDouble);
  for (double damping : {0.0, -0.5, std::numeric_limits<double>::infinity()}) {
    EXPECT_TRUE(ThrowsMentioning([&] { natgrad::kfac_damped_inverses(g, a, damping, false); },
                                 {"damping"}));
  }
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::kfac_damped_inverses(g, at::randn({4, 3}, at::kDouble), 0.1, false);
      },
      {"a_factor", "square"}));
  EXPECT_TRUE(
      ThrowsMentioning([&] { natgrad::kfac_damped_inverses(g.to(at::kLong), a, 0.1, false); },
                       {"g_factor", "floating"}));
  EXPECT_TRUE(
      ThrowsMentioning([&] { natgrad::kfac_damped_inverses(g, a.to(at::kFloat), 0.1, true); },
                       {"a_factor", "dtype"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::kfac_damped_inverses(g.expand({2, 3, 3}), a.expand({3, 4, 4}), 0.1, true);
      },
      {"batch dims"}));
  at::Tensor bad = g.clone();
  bad[1][1] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::kfac_damped_inverses(bad, a, 0.1, true); }, {"NaN"}));

  const at::Tensor dw = at::randn({3, 4}, at::kDouble);
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::kfac_precondition_inverse(dw, a, a); },
                               {"g_inverse", "shape"}));
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::kfac_precondition_inverse(dw, g, g); },
                               {"a_inverse", "shape"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::kfac_precondition_inverse(dw.expand({2, 3, 4}), g, a);
      },
      {"g_inverse", "shape"}));
}

// ---- Non-finite inputs ------------------------------------------------------------------------

// A copy of t with its second element set to `bad`.
at::Tensor spoiled(const at::Tensor& t, double bad) {
  at::Tensor out = t.clone(at::MemoryFormat::Contiguous);
  out.view({-1})[1] = bad;
  return out;
}

TEST(KfacPreconditionErrors, EigenFormRejectsNanOrInfNamingTheArgument) {
  at::manual_seed(71);
  const at::Tensor dw = at::randn({3, 4}, at::kDouble);
  auto [gw, gv] = at::linalg_eigh(random_spd(3));
  auto [aw, av] = at::linalg_eigh(random_spd(4));
  const std::vector<std::pair<const char*, int>> names = {{"grad", 0},
                                                          {"g_eigenvalues", 1},
                                                          {"g_eigenvectors", 2},
                                                          {"a_eigenvalues", 3},
                                                          {"a_eigenvectors", 4}};
  for (double bad :
       {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    for (const auto& [name, index] : names) {
      std::vector<at::Tensor> args = {dw, gw, gv, aw, av};
      args[index] = spoiled(args[index], bad);
      for (bool pi : {false, true}) {
        EXPECT_TRUE(ThrowsMentioning(
            [&] {
              natgrad::kfac_precondition_eigen(args[0], args[1], args[2], args[3], args[4], 0.1,
                                               pi);
            },
            {name, "contains NaN or Inf"}))
            << name << " = " << bad << ", pi " << pi;
      }
    }
  }
}

TEST(KfacPreconditionErrors, InverseFormsRejectNanOrInfNamingTheArgument) {
  at::manual_seed(72);
  const at::Tensor dw = at::randn({3, 4}, at::kDouble);
  const at::Tensor g = at::inverse(random_spd(3)), a = at::inverse(random_spd(4));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::kfac_precondition_inverse(spoiled(dw, nan), g, a); },
                               {"grad", "NaN or Inf"}));
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::kfac_precondition_inverse(dw, spoiled(g, nan), a); },
                               {"g_inverse", "NaN or Inf"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::kfac_precondition_inverse(dw, g,
                                           spoiled(a, -std::numeric_limits<double>::infinity()));
      },
      {"a_inverse", "NaN or Inf"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] {
        natgrad::kfac_damped_inverses(random_spd(3), spoiled(random_spd(4), nan), 0.1, false);
      },
      {"a_factor", "NaN or Inf"}));
}

TEST(KfacPreconditionErrors, OverflowOfFiniteInputsIsReportedAsOverflow) {
  const at::Tensor dw = at::full({2, 2}, 3e38, at::kFloat);
  const at::Tensor eye = at::eye(2, at::kFloat);
  EXPECT_TRUE(ThrowsMentioning([&] { natgrad::kfac_precondition_inverse(dw, eye * 2, eye); },
                               {"overflowed Float", "every input is finite"}));
}

// ---- Diagonal A (an embedding: token frequencies), G in its eigenbasis ----------------------

TEST(KfacPreconditionDiagonalA, EqualsTheDenseSolveAndFactoredDamping) {
  at::manual_seed(401);
  const at::Tensor g = random_spd(4), a = at::rand({6}, at::kDouble) + 0.1;
  const at::Tensor dw = at::randn({4, 6}, at::kDouble);
  const auto [gw, gv] = eig(g, at::kDouble);
  for (const double damping : {1e-3, 0.5}) {
    EXPECT_TRUE(AllClose(natgrad::kfac_precondition_diagonal_a(dw, a, gw, gv, damping, false),
                         ref_kron_solve(dw, g, at::diag(a), damping), kTol64));
    EXPECT_TRUE(AllClose(natgrad::kfac_precondition_diagonal_a(dw, a, gw, gv, damping, true),
                         ref_factored(dw, g, at::diag(a), damping, ref_pi(g, at::diag(a))),
                         kTol64));
  }
  // float32 in, float32 out, same numbers to float32 accuracy
  const at::Tensor p32 = natgrad::kfac_precondition_diagonal_a(
      dw.to(at::kFloat), a.to(at::kFloat), gw.to(at::kFloat), gv.to(at::kFloat), 0.1, true);
  EXPECT_EQ(p32.scalar_type(), at::kFloat);
  EXPECT_TRUE(AllClose(p32, ref_factored(dw, g, at::diag(a), 0.1, ref_pi(g, at::diag(a))), kTol32));
}

TEST(KfacPreconditionDiagonalA, ClampsFrequenciesLeavesZeroDenominatorsAndPoisonsInf) {
  // G = diag(2, 4) (identity eigenvectors), a = (-1 -> 0, 1), no damping: column 0 unscaled.
  const at::Tensor gw = at::tensor({2.0, 4.0}, at::kDouble), eye = at::eye(2, at::kDouble);
  const at::Tensor dw = at::tensor({1.0, 2.0, 3.0, 4.0}, at::kDouble).reshape({2, 2});
  const at::Tensor p = natgrad::kfac_precondition_diagonal_a(
      dw, at::tensor({-1.0, 1.0}, at::kDouble), gw, eye, 0.0, false);
  EXPECT_TRUE(AllClose(p, at::tensor({1.0, 1.0, 3.0, 1.0}, at::kDouble).reshape({2, 2}), kTol64));
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor poisoned = natgrad::kfac_precondition_diagonal_a(
      dw, at::tensor({inf, 1.0}, at::kDouble), gw, eye, 0.1, false);
  EXPECT_TRUE(poisoned.isnan().all().item<bool>());  // not a silent 0 from x / Inf
}

TEST(KfacPreconditionDiagonalA, BadArgumentsAreNamed) {
  const at::Tensor dw = at::ones({3, 4}, at::kDouble), gw = at::ones({3}, at::kDouble);
  const at::Tensor gv = at::eye(3, at::kDouble), a = at::ones({4}, at::kDouble);
  EXPECT_TRUE(
      ThrowsMentioning([&] { natgrad::kfac_precondition_diagonal_a(dw, gw, gw, gv, 0.1, false); },
                       {"a_diagonal must have shape [4]"}));
  EXPECT_TRUE(
      ThrowsMentioning([&] { natgrad::kfac_precondition_diagonal_a(dw, a, a, gv, 0.1, false); },
                       {"g_eigenvalues must have shape [3]"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] { natgrad::kfac_precondition_diagonal_a(dw, a.to(at::kFloat), gw, gv, 0.1, false); },
      {"a_diagonal", "dtype"}));
  EXPECT_TRUE(ThrowsMentioning(
      [&] { natgrad::kfac_precondition_diagonal_a(dw, a, gw, gv, -1.0, false); }, {"damping"}));
}

}  // namespace
