// The fallback ladder shared by every factorisation natgrad performs on a symmetric PSD matrix.
//
// Rungs, tried in order until one yields a finite factorisation:
//   0  native   - the factorisation in the matrix's own dtype;
//   1  float64  - the same factorisation after promotion to float64 (skipped for float64 input);
//   2  jitter   - float64 with growing jitter added to the diagonal:
//                 j_k = 1e-8 * 10^k * mean|diag|, k = 0 .. kJitterSteps - 1;
//   3  diagonal - no factorisation: the caller falls back to the diagonal of the matrix.
// A rung fails when ATen raises (e.g. LinAlgError from a non-converging eigh or a non-PD
// Cholesky) or when the decomposition contains NaN or Inf.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace natgrad {

enum class Rung : int64_t { kNative = 0, kFloat64 = 1, kJitter = 2, kDiagonal = 3 };

inline constexpr int kJitterSteps = 9;

// Attempts a factorisation of `matrix` (already symmetric; dtype native or float64). Returns
// true on success and stores its results in captured state; may throw c10::Error on failure.
using LadderAttempt = std::function<bool(const at::Tensor& matrix)>;

// Climbs rungs 0..2 with `attempt` and returns the rung that succeeded, or Rung::kDiagonal
// when all failed (the caller then builds the diagonal fallback itself).
Rung climb_ladder(const at::Tensor& symmetric, const LadderAttempt& attempt);

// (M + M^T) / 2 over the last two dims: both triangles of a factor are read, never just one.
at::Tensor symmetrized(const at::Tensor& matrix);

// True when every element of every tensor is finite (one host read, however many tensors).
bool all_finite(std::initializer_list<at::Tensor> tensors);

namespace testing {
// Fault injection for tests: the next `count` ladder attempts fail as if ATen had raised.
// Process-wide and thread-safe; production code never calls it.
void force_ladder_failures(int64_t count);
int64_t pending_ladder_failures();
}  // namespace testing

}  // namespace natgrad
