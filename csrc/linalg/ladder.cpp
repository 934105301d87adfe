#include "linalg/ladder.h"

#include <c10/util/Exception.h>

#include "common/checks.h"

#include <atomic>
#include <cmath>

namespace natgrad {
namespace {

std::atomic<int64_t> g_forced_failures{0};

bool consume_forced_failure() {
  int64_t pending = g_forced_failures.load();
  while (pending > 0) {
    if (g_forced_failures.compare_exchange_weak(pending, pending - 1)) return true;
  }
  return false;
}

bool try_rung(const LadderAttempt& attempt, const at::Tensor& matrix) {
  if (consume_forced_failure()) return false;
  try {
    return attempt(matrix);
  } catch (const c10::Error&) {
    return false;
  }
}

}  // namespace

at::Tensor symmetrized(const at::Tensor& matrix) { return (matrix + matrix.mT()).mul_(0.5); }

bool all_finite(std::initializer_list<at::Tensor> tensors) {
  at::Tensor ok;  // per-tensor reductions combined on the device: one host read in all
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    const at::Tensor f = checks::finite_flag(t);
    ok = ok.defined() ? ok.logical_and_(f) : f;
  }
  return !ok.defined() || ok.item<bool>();
}

Rung climb_ladder(const at::Tensor& symmetric, const LadderAttempt& attempt) {
  if (try_rung(attempt, symmetric)) return Rung::kNative;
  const at::Tensor sym64 = symmetric.to(at::kDouble);
  if (symmetric.scalar_type() != at::kDouble && try_rung(attempt, sym64)) return Rung::kFloat64;

  // Jitter proportional to the matrix's scale, so the ladder behaves the same for a factor
  // and for 1e6 times that factor. An all-zero matrix gets an absolute jitter.
  const int64_t n = sym64.size(-1);
  double scale = sym64.diagonal(0, -2, -1).abs().mean().item<double>();
  if (!(scale > 0.0) || !std::isfinite(scale)) scale = 1.0;
  const at::Tensor eye = at::eye(n, sym64.options());
  for (int k = 0; k < kJitterSteps; ++k) {
    const double jitter = 1e-8 * std::pow(10.0, k) * scale;
    if (try_rung(attempt, sym64 + eye * jitter)) return Rung::kJitter;
  }
  return Rung::kDiagonal;
}

namespace testing {
void force_ladder_failures(int64_t count) { g_forced_failures.store(count < 0 ? 0 : count); }
int64_t pending_ladder_failures() { return g_forced_failures.load(); }
}  // namespace testing

}  // namespace natgrad
