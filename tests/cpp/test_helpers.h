// Helpers shared by natgrad's GoogleTest suite: tolerance checks, error-message checks, a fixture
// that always resets the ladder's fault injection, and independent float64 reference formulas
// written in plain ATen (they never call natgrad).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>

#include "linalg/ladder.h"

namespace natgrad_test {

// Tolerances: float64 results are compared at ~1e-10 relative, float32 at ~1e-4.
inline constexpr double kTol64 = 1e-10;
inline constexpr double kTol32 = 1e-4;

inline double tol_for(at::ScalarType dtype) { return dtype == at::kDouble ? kTol64 : kTol32; }

// max|actual - expected| <= atol + rtol * max|expected|, shapes equal, everything finite.
inline ::testing::AssertionResult AllClose(const at::Tensor& actual, const at::Tensor& expected,
                                           double rtol, double atol = 0.0) {
  if (!actual.defined() || !expected.defined()) {
    return ::testing::AssertionFailure() << "undefined tensor";
  }
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure()
           << "shape " << actual.sizes() << " != expected " << expected.sizes();
  }
  const at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  if (a.numel() == 0) return ::testing::AssertionSuccess();
  if (!at::isfinite(a).all().item<bool>()) {
    return ::testing::AssertionFailure() << "actual holds NaN or Inf";
  }
  const double err = (a - e).abs().max().item<double>();
  const double scale = e.abs().max().item<double>();
  if (err <= atol + rtol * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max abs error " << err << " > " << atol << " + " << rtol
                                       << " * " << scale << " (max|expected|)";
}

inline ::testing::AssertionResult AllFinite(const at::Tensor& t) {
  if (at::isfinite(t).all().item<bool>()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "tensor holds NaN or Inf";
}

// Runs `fn`, which must throw c10::Error whose message contains every one of `needles`.
template <class Fn>
::testing::AssertionResult ThrowsMentioning(Fn&& fn, std::initializer_list<const char*> needles) {
  try {
    std::forward<Fn>(fn)();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const char* needle : needles) {
      if (msg.find(needle) == std::string::npos) {
        return ::testing::AssertionFailure() << "message lacks \"" << needle << "\": " << msg;
      }
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-c10 exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// Every test that forces ladder failures derives from this fixture, so a failing assertion can
// never leak pending failures into the next test.
class LadderTest : public ::testing::Test {
 protected:
  void SetUp() override { natgrad::testing::force_ladder_failures(0); }
  void TearDown() override { natgrad::testing::force_ladder_failures(0); }
};

// ----------------------------------------------------------------------------------------------
// Reference formulas (float64, plain ATen).
// ----------------------------------------------------------------------------------------------

// [rows, d] -> [rows, d + 1] with an explicit column of ones.
inline at::Tensor with_ones_column(const at::Tensor& rows) {
  return at::cat({rows, at::ones({rows.size(0), 1}, rows.options())}, 1);
}

// X^T X / rows for a row matrix X.
inline at::Tensor mean_gram(const at::Tensor& rows) {
  return at::matmul(rows.t(), rows) / static_cast<double>(rows.size(0));
}

// A symmetric positive-definite [n, n] float64 matrix with eigenvalues in [lo, hi].
inline at::Tensor random_spd(int64_t n, double lo = 0.5, double hi = 2.0) {
  const at::Tensor q = std::get<0>(at::linalg_qr(at::randn({n, n}, at::kDouble)));
  const at::Tensor evals = at::linspace(lo, hi, n, at::kDouble);
  return at::matmul(q * evals, q.t());
}

// A symmetric PSD [n, n] float64 matrix of rank r (a Gram matrix of r samples).
inline at::Tensor random_psd_rank(int64_t n, int64_t r) {
  return mean_gram(at::randn({r, n}, at::kDouble));
}

// Column-stacking vec of a matrix [m, n] -> [m * n] (vec(G W A) = (A (x) G) vec(W)).
inline at::Tensor vec_columns(const at::Tensor& w) { return w.t().reshape({-1}); }

inline at::Tensor unvec_columns(const at::Tensor& v, int64_t m, int64_t n) {
  return v.reshape({n, m}).t();
}

}  // namespace natgrad_test
