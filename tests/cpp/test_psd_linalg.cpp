// The fallback ladder (linalg/ladder.h) and the PSD factorisations built on it
// (linalg/psd_linalg.h): damped_eigh and spd_solve, with failures forced on purpose.
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "natgrad.h"
#include "test_helpers.h"

namespace {

using natgrad::Rung;
using natgrad::testing::force_ladder_failures;
using natgrad::testing::pending_ladder_failures;
using natgrad_test::AllClose;
using natgrad_test::AllFinite;
using natgrad_test::kTol32;
using natgrad_test::kTol64;
using natgrad_test::random_spd;
using natgrad_test::ThrowsMentioning;
using natgrad_test::tol_for;

class Ladder : public natgrad_test::LadderTest {};
class DampedEigh : public natgrad_test::LadderTest {};
class SpdSolve : public natgrad_test::LadderTest {};

// V^T F V is diagonal (relative to |F|) and V is orthonormal.
::testing::AssertionResult Diagonalises(const at::Tensor& evecs, const at::Tensor& factor,
                                        double tol) {
  const at::Tensor v = evecs.to(at::kDouble), f = factor.to(at::kDouble);
  const at::Tensor eye = at::eye(v.size(-1), at::kDouble).expand_as(v);
  auto ortho = AllClose(at::matmul(v.mT(), v), eye, tol, tol);
  if (!ortho) return ortho << " (eigenvectors are not orthonormal)";
  const at::Tensor d = at::matmul(at::matmul(v.mT(), f), v);
  const at::Tensor off = d - at::diag_embed(d.diagonal(0, -2, -1));
  return AllClose(off, at::zeros_like(off), 0.0, tol * f.abs().max().item<double>())
         << " (off-diagonal of V^T F V)";
}

// ---- climb_ladder itself --------------------------------------------------------------------

TEST_F(Ladder, AlwaysFailingAttemptVisitsEveryRungWithGrowingJitter) {
  at::manual_seed(100);
  const at::Tensor m = random_spd(4).to(at::kFloat);
  std::vector<at::Tensor> seen;
  const Rung rung = natgrad::climb_ladder(m, [&](const at::Tensor& x) {
    seen.push_back(x.clone());
    return false;
  });
  EXPECT_EQ(rung, Rung::kDiagonal);
  ASSERT_EQ(seen.size(), 2u + natgrad::kJitterSteps);
  EXPECT_EQ(seen[0].scalar_type(), at::kFloat);
  EXPECT_TRUE(seen[0].equal(m));
  EXPECT_EQ(seen[1].scalar_type(), at::kDouble);
  const at::Tensor m64 = m.to(at::kDouble);
  EXPECT_TRUE(seen[1].equal(m64));
  const double scale = m64.diagonal().abs().mean().item<double>();
  for (int k = 0; k < natgrad::kJitterSteps; ++k) {
    const double jitter = 1e-8 * std::pow(10.0, k) * scale;
    EXPECT_TRUE(AllClose(seen[2 + k], m64 + at::eye(4, at::kDouble) * jitter, 1e-14)) << k;
  }
}

TEST_F(Ladder, Float64InputSkipsTheFloat64RungAndZeroMatrixGetsAbsoluteJitter) {
  const at::Tensor zero = at::zeros({3, 3}, at::kDouble);
  std::vector<at::Tensor> seen;
  const Rung rung = natgrad::climb_ladder(zero, [&](const at::Tensor& x) {
    seen.push_back(x.clone());
    return false;
  });
  EXPECT_EQ(rung, Rung::kDiagonal);
  ASSERT_EQ(seen.size(), 1u + natgrad::kJitterSteps);
  EXPECT_TRUE(AllClose(seen[1], at::eye(3, at::kDouble) * 1e-8, 1e-14));
}

TEST_F(Ladder, ThrowingAttemptCountsAsAFailedRung) {
  int calls = 0;
  const Rung rung = natgrad::climb_ladder(at::eye(2), [&](const at::Tensor&) {
    TORCH_CHECK(++calls > 1, "simulated LinAlgError");
    return true;
  });
  EXPECT_EQ(rung, Rung::kFloat64);
  EXPECT_EQ(calls, 2);
}

TEST_F(Ladder, ForcedFailuresAreCountedConsumedAndReset) {
  force_ladder_failures(3);
  EXPECT_EQ(pending_ladder_failures(), 3);
  int calls = 0;
  const Rung rung =
      natgrad::climb_ladder(at::eye(2), [&](const at::Tensor&) { return ++calls > 0; });
  EXPECT_EQ(rung, Rung::kJitter);  // native, float64 and the first jitter step were forced
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(pending_ladder_failures(), 0);
  force_ladder_failures(-5);
  EXPECT_EQ(pending_ladder_failures(), 0);
}

TEST_F(Ladder, SymmetrizedAveragesBothTrianglesAndAllFiniteSpotsNaN) {
  const at::Tensor m = at::tensor({1.0, 2.0, 4.0, 3.0}, at::kDouble).reshape({2, 2});
  EXPECT_TRUE(AllClose(natgrad::symmetrized(m),
                       at::tensor({1.0, 3.0, 3.0, 3.0}, at::kDouble).reshape({2, 2}), kTol64));
  EXPECT_TRUE(natgrad::all_finite({m, at::empty({0})}));
  EXPECT_FALSE(natgrad::all_finite({m, at::tensor({1.0, std::nan("")})}));
  EXPECT_FALSE(natgrad::all_finite({at::tensor({-std::numeric_limits<double>::infinity()})}));
}

// ---- damped_eigh ----------------------------------------------------------------------------

TEST_F(DampedEigh, MatchesTheReferenceSpectrumAndReconstructsTheFactor) {
  at::manual_seed(101);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    for (int64_t n : {1, 5, 16}) {
      const at::Tensor f = random_spd(n, 0.1, 3.0).to(dtype);
      const natgrad::EighResult r = natgrad::damped_eigh(f, 0.25);
      EXPECT_EQ(r.rung, Rung::kNative);
      EXPECT_EQ(r.eigenvalues.scalar_type(), dtype);
      EXPECT_EQ(r.eigenvectors.scalar_type(), dtype);
      const double tol = tol_for(dtype);
      EXPECT_TRUE(AllClose(r.eigenvalues, at::linalg_eigvalsh(f.to(at::kDouble)) + 0.25, tol));
      const at::Tensor v = r.eigenvectors.to(at::kDouble);
      const at::Tensor rebuilt = at::matmul(v * (r.eigenvalues.to(at::kDouble) - 0.25), v.t());
      EXPECT_TRUE(AllClose(rebuilt, f, tol)) << "n=" << n;
      EXPECT_TRUE(Diagonalises(r.eigenvectors, f, tol));
    }
  }
}

TEST_F(DampedEigh, HandlesABatchOfFactorsAndSymmetrisesItsInput) {
  at::manual_seed(102);
  const at::Tensor f = at::stack({random_spd(4), random_spd(4), random_spd(4)});
  const at::Tensor noise = at::randn({3, 4, 4}, at::kDouble) * 0.1;
  const at::Tensor skewed = f + noise - noise.mT();  // symmetric part is f
  const natgrad::EighResult r = natgrad::damped_eigh(skewed, 0.0);
  EXPECT_EQ(r.eigenvalues.sizes(), (at::IntArrayRef{3, 4}));
  EXPECT_TRUE(AllClose(r.eigenvalues, at::linalg_eigvalsh(f), kTol64));
  EXPECT_TRUE(Diagonalises(r.eigenvectors, f, kTol64));
}

TEST_F(DampedEigh, SingularFactorsHaveEigenvaluesClampedAtExactlyZero) {
  at::manual_seed(103);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const at::Tensor f = natgrad_test::random_psd_rank(6, 2).to(dtype);  // rank 2 of 6
    const natgrad::EighResult r = natgrad::damped_eigh(f, 0.0);
    EXPECT_TRUE(AllFinite(r.eigenvalues));
    EXPECT_TRUE(AllFinite(r.eigenvectors));
    EXPECT_GE(r.eigenvalues.min().item<double>(), 0.0);
    const at::Tensor ref = at::linalg_eigvalsh(f.to(at::kDouble));
    EXPECT_TRUE(AllClose(r.eigenvalues.slice(0, 4), ref.slice(0, 4).clamp_min(0.0), 0.0,
                         tol_for(dtype) * ref.max().item<double>()));
    EXPECT_TRUE(AllClose(r.eigenvalues.slice(0, 4, 6), ref.slice(0, 4, 6), tol_for(dtype)));

    const natgrad::EighResult damped = natgrad::damped_eigh(f, 0.1);
    EXPECT_GE(damped.eigenvalues.min().item<double>(),
              at::scalar_tensor(0.1, dtype).item<double>());
  }
  const natgrad::EighResult zero = natgrad::damped_eigh(at::zeros({5, 5}), 0.5);
  EXPECT_TRUE(zero.eigenvalues.equal(at::full({5}, 0.5)));
  EXPECT_TRUE(Diagonalises(zero.eigenvectors, at::eye(5), kTol32));
}

TEST_F(DampedEigh, IllConditionedFloat32FactorGivesFiniteOutput) {
  at::manual_seed(104);
  const int64_t n = 8;
  const at::Tensor q = std::get<0>(at::linalg_qr(at::randn({n, n}, at::kDouble)));
  const at::Tensor spectrum = at::logspace(-12, 0, n, 10.0, at::kDouble);
  const at::Tensor f = at::matmul(q * spectrum, q.t()).to(at::kFloat);
  const natgrad::EighResult r = natgrad::damped_eigh(f, 0.0);
  EXPECT_TRUE(AllFinite(r.eigenvalues));
  EXPECT_TRUE(AllFinite(r.eigenvectors));
  EXPECT_GE(r.eigenvalues.min().item<double>(), 0.0);
  EXPECT_NEAR(r.eigenvalues.max().item<double>(), 1.0, kTol32);
  const at::Tensor v = r.eigenvectors.to(at::kDouble);
  EXPECT_TRUE(AllClose(at::matmul(v * r.eigenvalues.to(at::kDouble), v.t()), f, kTol32));

  const natgrad::SolveResult s = natgrad::spd_solve(f, at::ones({n, 2}));
  EXPECT_TRUE(AllFinite(s.solution));
}

TEST_F(DampedEigh, ForcedFailureOnceClimbsToFloat64) {
  at::manual_seed(105);
  const at::Tensor f = random_spd(6).to(at::kFloat);
  force_ladder_failures(1);
  const natgrad::EighResult r = natgrad::damped_eigh(f, 0.1);
  EXPECT_EQ(r.rung, Rung::kFloat64);
  EXPECT_EQ(pending_ladder_failures(), 0);
  EXPECT_EQ(r.eigenvalues.scalar_type(), at::kFloat);  // outputs keep the factor's dtype
  EXPECT_EQ(r.eigenvectors.scalar_type(), at::kFloat);
  EXPECT_TRUE(AllClose(r.eigenvalues, at::linalg_eigvalsh(f.to(at::kDouble)) + 0.1, kTol32));
  EXPECT_TRUE(Diagonalises(r.eigenvectors, f, kTol32));
}

TEST_F(DampedEigh, ForcedFailuresReachTheJitterRungWhoseEigenvectorsStillDiagonalise) {
  at::manual_seed(106);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const at::Tensor f = random_spd(6).to(dtype);
    const int64_t before_jitter = dtype == at::kDouble ? 1 : 2;
    const double scale = f.to(at::kDouble).diagonal().abs().mean().item<double>();
    const at::Tensor ref = at::linalg_eigvalsh(f.to(at::kDouble));
    // First and last jitter steps: eigenvalues are those of F + j_k I.
    for (int k : {0, natgrad::kJitterSteps - 1}) {
      force_ladder_failures(before_jitter + k);
      const natgrad::EighResult r = natgrad::damped_eigh(f, 0.0);
      EXPECT_EQ(r.rung, Rung::kJitter) << "k=" << k;
      EXPECT_TRUE(Diagonalises(r.eigenvectors, f, tol_for(dtype)));
      const double jitter = 1e-8 * std::pow(10.0, k) * scale;
      EXPECT_TRUE(AllClose(r.eigenvalues, ref + jitter, tol_for(dtype))) << "k=" << k;
    }
  }
}

TEST_F(DampedEigh, ExhaustedLadderFallsBackToTheDiagonal) {
  at::manual_seed(107);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    at::Tensor f = random_spd(5).to(dtype);
    f[2][2] = -0.5;  // a negative diagonal entry is clamped like an eigenvalue
    force_ladder_failures((dtype == at::kDouble ? 1 : 2) + natgrad::kJitterSteps);
    const natgrad::EighResult r = natgrad::damped_eigh(f, 0.3);
    EXPECT_EQ(r.rung, Rung::kDiagonal);
    EXPECT_EQ(pending_ladder_failures(), 0);
    EXPECT_TRUE(
        AllClose(r.eigenvalues, f.diagonal().to(at::kDouble).clamp_min(0.0) + 0.3, tol_for(dtype)));
    EXPECT_TRUE(r.eigenvectors.equal(at::eye(5, dtype)));
  }
}

TEST_F(DampedEigh, OpReportsTheRungAsAnInt64ScalarThroughTheDispatcher) {
  at::manual_seed(108);
  const at::Tensor f = random_spd(4).to(at::kFloat);
  force_ladder_failures(1);
  const auto [evals, evecs, rung] =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("natgrad::damped_eigh", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, double)>()
          .call(f, 0.0);
  EXPECT_EQ(rung.dim(), 0);
  EXPECT_EQ(rung.scalar_type(), at::kLong);
  EXPECT_EQ(rung.item<int64_t>(), static_cast<int64_t>(Rung::kFloat64));
  EXPECT_TRUE(AllClose(evals, at::linalg_eigvalsh(f.to(at::kDouble)), kTol32));
  EXPECT_TRUE(Diagonalises(evecs, f, kTol32));
}

TEST_F(DampedEigh, RejectsBadArgumentsNamingThem) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(ThrowsMentioning(
      [] {
        natgrad::damped_eigh(at::randn({3, 4}), 0.0);
      },
      {"factor", "square"}));
  EXPECT_TRUE(
      ThrowsMentioning([] { natgrad::damped_eigh(at::randn({3}), 0.0); }, {"factor", "square"}));
  EXPECT_TRUE(ThrowsMentioning([] { natgrad::damped_eigh(at::eye(3, at::kLong), 0.0); },
                               {"factor", "floating"}));
  EXPECT_TRUE(ThrowsMentioning(
      [] {
        natgrad::damped_eigh(at::zeros({0, 0}), 0.0);
      },
      {"factor", "empty"}));
  for (double damping : {-1e-3, nan, std::numeric_limits<double>::infinity()}) {
    EXPECT_TRUE(ThrowsMentioning([&] { natgrad::damped_eigh(at::eye(3), damping); }, {"damping"}));
  }
  for (double bad : {nan, std::numeric_limits<double>::infinity()}) {
    at::Tensor f = at::eye(3);
    f[0][1] = bad;
    EXPECT_TRUE(ThrowsMentioning([&] { natgrad::damped_eigh(f, 0.1); }, {"factor", "NaN"}));
  }
}

// ---- spd_solve ------------------------------------------------------------------------------

TEST_F(SpdSolve, MatchesTheDenseSolveForSingleAndBatchedSystems) {
  at::manual_seed(110);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const at::Tensor s = random_spd(7).to(dtype);
    const at::Tensor b = at::randn({7, 3}, dtype);
    const natgrad::SolveResult r = natgrad::spd_solve(s, b);
    EXPECT_EQ(r.rung, Rung::kNative);
    EXPECT_EQ(r.solution.scalar_type(), dtype);
    EXPECT_TRUE(AllClose(r.solution, at::linalg_solve(s.to(at::kDouble), b.to(at::kDouble)),
                         tol_for(dtype)));
  }
  const at::Tensor s = at::stack({random_spd(4), random_spd(4)});
  const at::Tensor b = at::randn({2, 4, 2}, at::kDouble);
  EXPECT_TRUE(AllClose(natgrad::spd_solve(s, b).solution, at::linalg_solve(s, b), kTol64));
}

TEST_F(SpdSolve, ForcedFailuresReachEachRung) {
  at::manual_seed(111);
  const at::Tensor s = random_spd(5).to(at::kFloat);
  const at::Tensor b = at::randn({5, 2}, at::kFloat);
  const at::Tensor ref = at::linalg_solve(s.to(at::kDouble), b.to(at::kDouble));

  force_ladder_failures(1);
  natgrad::SolveResult r = natgrad::spd_solve(s, b);
  EXPECT_EQ(r.rung, Rung::kFloat64);
  EXPECT_EQ(r.solution.scalar_type(), at::kDouble);  // the promoted system's dtype
  EXPECT_TRUE(AllClose(r.solution, ref, kTol64));

  force_ladder_failures(2);
  r = natgrad::spd_solve(s, b);
  EXPECT_EQ(r.rung, Rung::kJitter);
  EXPECT_TRUE(AllClose(r.solution, ref, 1e-6));  // jitter 1e-8 * mean|diag|

  force_ladder_failures(2 + natgrad::kJitterSteps);
  r = natgrad::spd_solve(s, b);
  EXPECT_EQ(r.rung, Rung::kDiagonal);  // Jacobi: rhs / diag(S)
  EXPECT_TRUE(
      AllClose(r.solution, b.to(at::kDouble) / s.to(at::kDouble).diagonal().unsqueeze(1), kTol64));
  EXPECT_EQ(pending_ladder_failures(), 0);
}

TEST_F(SpdSolve, SingularAndIndefiniteSystemsClimbTheLadderWithoutForcing) {
  const at::Tensor rhs = at::ones({3, 1}, at::kDouble);
  const natgrad::SolveResult zero = natgrad::spd_solve(at::zeros({3, 3}, at::kDouble), rhs);
  EXPECT_EQ(zero.rung, Rung::kJitter);  // absolute jitter 1e-8 makes it PD
  EXPECT_TRUE(AllClose(zero.solution, rhs / 1e-8, 1e-6));

  const at::Tensor indefinite = at::diag(at::tensor({1.0, -5.0, 2.0}, at::kDouble));
  const natgrad::SolveResult r = natgrad::spd_solve(indefinite, rhs);
  EXPECT_EQ(r.rung, Rung::kDiagonal);  // even the largest jitter (mean|diag|) leaves -5 + 8/3 < 0
  EXPECT_TRUE(AllFinite(r.solution));
  EXPECT_DOUBLE_EQ(r.solution[0][0].item<double>(), 1.0);
  EXPECT_DOUBLE_EQ(r.solution[2][0].item<double>(), 0.5);
}

TEST_F(SpdSolve, InverseMatchesTheDenseInverseIsSymmetricAndClimbsTheLadder) {
  at::manual_seed(112);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const at::Tensor s = random_spd(6).to(dtype);
    const natgrad::SolveResult r = natgrad::spd_inverse(s);
    EXPECT_EQ(r.rung, Rung::kNative);
    EXPECT_EQ(r.solution.scalar_type(), dtype);
    EXPECT_TRUE(AllClose(r.solution, at::linalg_inv(s.to(at::kDouble)), tol_for(dtype)));
    EXPECT_TRUE(at::equal(r.solution, r.solution.mT()));
  }
  const at::Tensor batch = at::stack({random_spd(4), random_spd(4)});
  EXPECT_TRUE(AllClose(natgrad::spd_inverse(batch).solution, at::linalg_inv(batch), kTol64));
  const at::Tensor s = random_spd(5).to(at::kFloat);
  force_ladder_failures(1);
  natgrad::SolveResult r = natgrad::spd_inverse(s);
  EXPECT_EQ(r.rung, Rung::kFloat64);
  EXPECT_TRUE(AllClose(r.solution, at::linalg_inv(s.to(at::kDouble)), kTol64));
  force_ladder_failures(2 + natgrad::kJitterSteps);
  r = natgrad::spd_inverse(s);
  EXPECT_EQ(r.rung, Rung::kDiagonal);  // Jacobi: diag(S)^-1
  EXPECT_TRUE(AllClose(r.solution, at::diag(1.0 / s.to(at::kDouble).diagonal()), kTol64));
  EXPECT_EQ(pending_ladder_failures(), 0);
}

}  // namespace
