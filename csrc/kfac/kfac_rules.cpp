// The shared K-FAC rules (see kfac_rules.h) and their op registrations.
#include "kfac/kfac_rules.h"

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace natgrad::kfac {

// ---- statistics bound ----------------------------------------------------------------------

double statistics_limit(at::ScalarType factor_dtype) {
  TORCH_CHECK(at::isFloatingType(factor_dtype), "factor_dtype must be a floating-point dtype, got ",
              factor_dtype);
  double max = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, factor_dtype, "statistics_limit", [&] {
    max = static_cast<double>(std::numeric_limits<scalar_t>::max());
  });
  return max / 4;
}

double grad_count(int64_t grad_rows, double grad_scale) {
  return static_cast<double>(std::max<int64_t>(grad_rows, 1)) *
         std::max(grad_scale * grad_scale, 1.0);
}

bool within_bound(double peak, double count, at::ScalarType factor_dtype) {
  return peak * peak * count < statistics_limit(factor_dtype);  // NaN and Inf compare false
}

at::Tensor max_abs(const at::Tensor& t) {
  if (t.numel() == 0) return at::zeros({}, t.options().dtype(at::kDouble));
  const auto [low, high] = at::aminmax(t);
  return at::maximum(high, low.neg()).to(at::kDouble);
}

at::Tensor peak_bounded(const at::Tensor& peak, double count, at::ScalarType factor_dtype) {
  TORCH_CHECK(peak.defined() && peak.dim() == 0, "peak must be a 0-d tensor, got ",
              peak.defined() ? peak.sizes() : at::IntArrayRef{});
  const double limit = statistics_limit(factor_dtype);
  const at::Tensor p = peak.to(at::kDouble);
  return p.mul(p).mul(count).lt(limit);
}

at::Tensor statistics_ok(const at::Tensor& inputs, const at::Tensor& grad_outputs,
                         int64_t input_rows, int64_t grad_rows, double grad_scale,
                         at::ScalarType factor_dtype) {
  TORCH_CHECK(grad_outputs.defined() && at::isFloatingType(grad_outputs.scalar_type()),
              "grad_outputs must be a floating-point tensor");
  TORCH_CHECK(inputs.defined(), "inputs must be a defined tensor");
  at::Tensor ok =
      peak_bounded(max_abs(grad_outputs), grad_count(grad_rows, grad_scale), factor_dtype);
  if (inputs.is_floating_point()) {
    const double count = static_cast<double>(std::max<int64_t>(input_rows, 1));
    ok = ok.logical_and(peak_bounded(max_abs(inputs), count, factor_dtype).to(ok.device()));
  }
  return ok;
}

// ---- hyperparameters -----------------------------------------------------------------------

const std::vector<OptionBound>& option_bounds() {
  constexpr double kNone = std::numeric_limits<double>::infinity();
  static const std::vector<OptionBound> bounds = {
      // name, low, low_open, high, high_open, integer, per_group
      {"lr", 0.0, false, kNone, false, false, true},
      {"momentum", 0.0, false, 1.0, true, false, true},
      {"weight_decay", 0.0, false, kNone, false, false, true},
      {"damping", 0.0, true, kNone, false, false, true},
      {"factor_decay", 0.0, false, 1.0, true, false, false},
      {"factor_update_period", 1.0, false, kNone, false, true, false},
      {"inverse_update_period", 1.0, false, kNone, false, true, false},
      {"kl_clip", 0.0, true, kNone, false, false, false},
      {"adaptive_period", 1.0, false, kNone, false, true, false},
      {"nll_scale", 0.0, true, kNone, false, false, false},
  };
  return bounds;
}

const OptionBound& option_bound(const std::string& name) {
  for (const auto& bound : option_bounds()) {
    if (bound.name == name) return bound;
  }
  TORCH_CHECK(false, "no K-FAC hyperparameter is named '", name, "'");
}

const std::vector<std::string>& option_choices(const std::string& name) {
  static const std::vector<std::string> inverse_method = {"eigen", "inverse"};
  static const std::vector<std::string> loss_reduction = {"mean", "sum", "token_mean"};
  if (name == "inverse_method") return inverse_method;
  TORCH_CHECK(name == "loss_reduction", "no K-FAC choice option is named '", name, "'");
  return loss_reduction;
}

namespace {

// TORCH_CHECK that `value` is one of option_choices(name): "<name> must be 'a', 'b' or 'c',
// got '<value>'".
void check_choice(const std::string& name, const std::string& value) {
  const auto& choices = option_choices(name);
  if (std::find(choices.begin(), choices.end(), value) != choices.end()) return;
  std::string expected;
  for (size_t i = 0; i < choices.size(); ++i) {
    expected += (i == 0 ? "'" : i + 1 == choices.size() ? " or '" : ", '") + choices[i] + "'";
  }
  TORCH_CHECK(false, name, " must be ", expected, ", got '", value, "'");
}

}  // namespace

// ---- rows and the sample scale -------------------------------------------------------------

namespace {

int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

int64_t product(at::IntArrayRef sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

}  // namespace

int64_t linear_rows(at::IntArrayRef input_shape, int64_t in_features) {
  return product(input_shape) / std::max<int64_t>(in_features, 1);
}

int64_t conv_rows(at::IntArrayRef input_shape, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const size_t d = kernel_size.size();
  TORCH_CHECK(d >= 1 && stride.size() == d && padding.size() == d && dilation.size() == d,
              "kernel_size, stride, padding and dilation must have one entry per spatial "
              "dimension, got ",
              kernel_size, ", ", stride, ", ", padding, " and ", dilation);
  for (size_t i = 0; i < d; ++i) {
    TORCH_CHECK(stride[i] >= 1, "stride must be positive, got ", stride);
  }
  if (input_shape.size() != d + 2) return 1;  // an unbatched input: one row
  int64_t rows = input_shape[0];
  for (size_t i = 0; i < d; ++i) {
    const int64_t size = input_shape[2 + i];
    rows *=
        floor_div(size + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1, stride[i]) + 1;
  }
  return rows;
}

int64_t embedding_rows(at::IntArrayRef input_shape) { return product(input_shape); }

double sample_scale(int64_t samples, int64_t rows, const std::string& loss_reduction,
                    int64_t batch) {
  check_choice("loss_reduction", loss_reduction);
  TORCH_CHECK(samples >= 0 && rows >= 0 && batch >= 0,
              "samples, rows and batch must be >= 0, got ", samples, ", ", rows, " and ", batch);
  // one call shared by the batch: its gradient sums `batch` samples' gradients of `rows` rows each
  const bool shared = samples == 1 && batch > 1;
  const double n = static_cast<double>(shared ? batch : samples);
  const double r = static_cast<double>(rows) * (shared ? n : 1.0);
  const double share = shared ? std::sqrt(n) : 1.0;
  if (loss_reduction == "sum") return 1.0 / share;
  if (loss_reduction == "mean") return n / share;
  return std::sqrt(n * r) / share;
}

double expand_grad_scale(double grad_scale, int64_t samples, int64_t input_rows,
                         int64_t grad_rows) {
  TORCH_CHECK(samples >= 0 && input_rows >= 0 && grad_rows >= 0,
              "samples, input_rows and grad_rows must be >= 0, got ", samples, ", ", input_rows,
              " and ", grad_rows);
  const int64_t positions = std::max<int64_t>(input_rows / std::max<int64_t>(samples, 1), 1);
  const int64_t passes = std::max<int64_t>(grad_rows / std::max<int64_t>(input_rows, 1), 1);
  return grad_scale * std::sqrt(static_cast<double>(positions * passes));
}

// ---- pi correction and damping -------------------------------------------------------------

bool pi_correction_enabled(const std::string& inverse_method, std::optional<bool> pi_correction) {
  check_choice("inverse_method", inverse_method);
  return pi_correction.has_value() ? *pi_correction : inverse_method == "inverse";
}

double resolved_damping(double damping, double multiplier) {
  TORCH_CHECK(std::isfinite(damping) && damping > 0, "damping must be a finite number > 0, got ",
              damping);
  TORCH_CHECK(std::isfinite(multiplier) && multiplier > 0,
              "multiplier must be a finite number > 0, got ", multiplier);
  return damping * multiplier;
}

DampingAdaptation adapt_damping(double multiplier, double loss_change, double model_change,
                                double decay, int64_t interval) {
  TORCH_CHECK(decay > 0 && decay < 1, "decay must be in (0, 1), got ", decay);
  TORCH_CHECK(interval >= 1, "interval must be >= 1, got ", interval);
  const double ratio =
      model_change < 0 ? loss_change / model_change : -std::numeric_limits<double>::infinity();
  const double omega = std::pow(decay, static_cast<double>(interval));
  if (ratio > 0.75) {
    multiplier *= omega;
  } else if (ratio < 0.25) {
    multiplier /= omega;
  }
  return {std::min(std::max(multiplier, 1e-8), 1e8), ratio};
}

// ---- adaptive learning rate and momentum ---------------------------------------------------

QuadraticStep quadratic_step(double a00, double a01, double a11, double b0, double b1,
                             bool adapt_momentum, double fixed_momentum) {
  for (double v : {a00, a01, a11, b0, b1, fixed_momentum}) {
    if (!std::isfinite(v)) return {0.0, 0.0, 0.0, false};
  }
  double alpha = 0.0;
  double mu = adapt_momentum ? 0.0 : fixed_momentum;
  if (adapt_momentum) {
    const double det = a00 * a11 - a01 * a01;
    if (a00 > 0 && a11 > 0 && det > 1e-12 * a00 * a11) {
      alpha = (a01 * b1 - a11 * b0) / det;
      mu = (a01 * b0 - a00 * b1) / det;
    } else if (a00 > 0) {  // no previous update, or one parallel to the proposal
      alpha = -b0 / a00;
    } else if (a11 > 0) {  // no proposal
      mu = -b1 / a11;
    }
  } else if (a00 > 0) {
    alpha = -(b0 + mu * a01) / a00;
  }
  const double change =
      0.5 * (alpha * alpha * a00 + 2.0 * alpha * mu * a01 + mu * mu * a11) + alpha * b0 + mu * b1;
  if (!std::isfinite(alpha) || !std::isfinite(mu) || !std::isfinite(change)) {
    return {0.0, 0.0, 0.0, false};
  }
  return {alpha, mu, change, true};
}

// ---- trust region --------------------------------------------------------------------------

double fsum(at::ArrayRef<double> values) {
  std::vector<double> partials;
  double plain = 0.0;
  bool finite = true;
  for (double v : values) {
    plain += v;
    finite = finite && std::isfinite(v);
  }
  if (!finite) return plain;
  for (double x : values) {  // Shewchuk: exact partials, non-overlapping, increasing magnitude
    size_t i = 0;
    for (double y : partials) {
      if (std::abs(x) < std::abs(y)) std::swap(x, y);
      const double hi = x + y;
      const double lo = y - (hi - x);
      if (lo != 0.0) partials[i++] = lo;
      x = hi;
    }
    partials.resize(i);
    partials.push_back(x);
  }
  // Sum from the top, then correct a half-way case (as CPython's math.fsum).
  size_t n = partials.size();
  double hi = 0.0, lo = 0.0;
  if (n > 0) {
    hi = partials[--n];
    while (n > 0) {
      const double x = hi, y = partials[--n];
      hi = x + y;
      lo = y - (hi - x);
      if (lo != 0.0) break;
    }
    if (n > 0 && ((lo < 0.0 && partials[n - 1] < 0.0) || (lo > 0.0 && partials[n - 1] > 0.0))) {
      const double y = lo * 2, x = hi + y;
      if (y == x - hi) hi = x;
    }
  }
  return hi;
}

TrustRegion trust_region(double kl_clip, at::ArrayRef<double> inner, at::ArrayRef<double> cross,
                         at::ArrayRef<double> lr, at::ArrayRef<double> momentum,
                         at::ArrayRef<double> kl_share) {
  TORCH_CHECK(std::isfinite(kl_clip) && kl_clip > 0, "kl_clip must be a finite number > 0, got ",
              kl_clip);
  const size_t n = inner.size();
  for (const auto& [size, name] :
       {std::pair{cross.size(), "cross"}, std::pair{lr.size(), "lr"},
        std::pair{momentum.size(), "momentum"}, std::pair{kl_share.size(), "kl_share"}}) {
    TORCH_CHECK(size == n, name, " must hold one entry per parameter (", n, " inner), got ", size);
  }
  std::vector<double> terms(n), weighted(n);
  for (size_t p = 0; p < n; ++p) {
    const double mu = momentum[p];
    terms[p] = inner[p] + 2 * mu * cross[p] + mu * mu * kl_share[p];
    weighted[p] = terms[p] * (lr[p] * lr[p]);
  }
  const double total = fsum(weighted);
  const double nu =
      total > 0 && std::isfinite(total) ? std::min(1.0, std::sqrt(kl_clip / total)) : 1.0;
  for (double& t : terms) t *= nu * nu;
  return {nu, std::move(terms)};
}

// ---- faults --------------------------------------------------------------------------------

Fault direction_fault(double grad_ok, double direction_ok) {
  if (grad_ok == 0.0) return Fault::kGradients;
  if (direction_ok == 0.0) return Fault::kDirections;
  return Fault::kNone;
}

Fault factor_fault(double updated, double finite) {
  if (updated == 0.0) return Fault::kStatistics;
  if (finite == 0.0) return Fault::kFactors;
  return Fault::kNone;
}

std::vector<int64_t> direction_faults(at::ArrayRef<double> rows, at::IntArrayRef offsets) {
  std::vector<int64_t> out;
  out.reserve(offsets.size());
  for (int64_t at : offsets) {
    TORCH_CHECK(at >= 0 && at + 1 < static_cast<int64_t>(rows.size()), "offsets entry ", at,
                " is outside rows (", rows.size(), " values; a row needs 2 from its offset)");
    out.push_back(static_cast<int64_t>(direction_fault(rows[at], rows[at + 1])));
  }
  return out;
}

std::vector<int64_t> factor_faults(at::ArrayRef<double> flags) {
  TORCH_CHECK(flags.size() % 2 == 0, "flags must hold 2 values per layer (updated, finite), got ",
              flags.size());
  std::vector<int64_t> out;
  out.reserve(flags.size() / 2);
  for (size_t i = 0; i < flags.size(); i += 2) {
    out.push_back(static_cast<int64_t>(factor_fault(flags[i], flags[i + 1])));
  }
  return out;
}

Fault fault_of(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 4, "fault must be a code in 0..4, got ", code);
  return static_cast<Fault>(code);
}

std::string fault_what(Fault fault) {
  switch (fault) {
    case Fault::kGradients:
      return "gradients";
    case Fault::kDirections:
      return "preconditioned gradients";
    case Fault::kStatistics:
      return "activations or output gradients";
    case Fault::kFactors:
      return "updated factors (reset)";
    default:
      return "";
  }
}

std::string fault_message(const std::string& optimizer, Fault fault, const std::string& kind,
                          const std::string& where) {
  TORCH_CHECK(fault != Fault::kNone, "fault_message needs a fault, got none");
  const bool doubled =
      where.find('\'') != std::string::npos && where.find('"') == std::string::npos;
  const char quote = doubled ? '"' : '\'';
  return optimizer + ": NaN or Inf (or values that would overflow) in the " + fault_what(fault) +
         " of " + kind + " " + quote + where + quote +
         "; its update is skipped this step (parameters and factors untouched)";
}

// ---- unsupported layers --------------------------------------------------------------------

std::string conv_unsupported_reason(int64_t groups, const std::string& padding,
                                    const std::string& padding_mode) {
  if (groups != 1) return "grouped convolution (groups=" + std::to_string(groups) + ")";
  const bool named = !padding.empty() && (padding[0] == '\'' || padding[0] == '"');
  if (named || padding_mode != "zeros") {
    return "padding=" + padding + ", padding_mode='" + padding_mode + "'";
  }
  return "";
}

std::string embedding_unsupported_reason(bool sparse, bool max_norm) {
  if (sparse) return "sparse gradients";
  if (max_norm) return "max_norm renormalises weights in forward";
  return "";
}

// ---- ops -----------------------------------------------------------------------------------

namespace {

std::tuple<double, std::vector<double>> trust_region_op(double kl_clip, at::ArrayRef<double> inner,
                                                        at::ArrayRef<double> cross,
                                                        at::ArrayRef<double> lr,
                                                        at::ArrayRef<double> momentum,
                                                        at::ArrayRef<double> kl_share) {
  TrustRegion t = trust_region(kl_clip, inner, cross, lr, momentum, kl_share);
  return {t.nu, std::move(t.kl_share)};
}

std::tuple<double, double> adapt_damping_op(double multiplier, double loss_change,
                                            double model_change, double decay, int64_t interval) {
  const DampingAdaptation a = adapt_damping(multiplier, loss_change, model_change, decay, interval);
  return {a.multiplier, a.ratio};
}

std::tuple<double, double, double, bool> quadratic_step_op(double a00, double a01, double a11,
                                                         double b0, double b1, bool adapt_momentum,
                                                         double fixed_momentum) {
  const QuadraticStep q = quadratic_step(a00, a01, a11, b0, b1, adapt_momentum, fixed_momentum);
  return {q.alpha, q.mu, q.model_change, q.finite};
}

std::string fault_message_op(const std::string& optimizer, int64_t fault, const std::string& kind,
                             const std::string& where) {
  return fault_message(optimizer, fault_of(fault), kind, where);
}

double fsum_op(at::ArrayRef<double> values) { return fsum(values); }

std::vector<std::string> option_names_op() {
  std::vector<std::string> names;
  for (const auto& bound : option_bounds()) names.push_back(bound.name);
  return names;
}

std::tuple<double, bool, double, bool, bool, bool> option_bound_op(const std::string& name) {
  const OptionBound& b = option_bound(name);
  return {b.low, b.low_open, b.high, b.high_open, b.integer, b.per_group};
}

}  // namespace

// Host-side rules on numbers (and one 0-d tensor reduction): one registration serves every
// device; the fake kernel of kfac_statistics_ok lives in python/natgrad/ops/rules.py.
TORCH_LIBRARY_IMPL(natgrad, CompositeExplicitAutograd, m) {
  m.impl("kfac_statistics_ok", &statistics_ok);
  m.impl("kfac_peak_bounded", &peak_bounded);
  m.impl("kfac_statistics_limit", &statistics_limit);
  m.impl("kfac_linear_rows", &linear_rows);
  m.impl("kfac_conv_rows", &conv_rows);
  m.impl("kfac_embedding_rows", &embedding_rows);
  m.impl("kfac_sample_scale", &sample_scale);
  m.impl("kfac_expand_grad_scale", &expand_grad_scale);
  m.impl("kfac_pi_correction", &pi_correction_enabled);
  m.impl("kfac_damping", &resolved_damping);
  m.impl("kfac_adapt_damping", &adapt_damping_op);
  m.impl("kfac_quadratic_step", &quadratic_step_op);
  m.impl("kfac_fsum", &fsum_op);
  m.impl("kfac_trust_region", &trust_region_op);
  m.impl("kfac_direction_faults", &direction_faults);
  m.impl("kfac_factor_faults", &factor_faults);
  m.impl("kfac_fault_message", &fault_message_op);
  m.impl("kfac_conv_unsupported_reason", &conv_unsupported_reason);
  m.impl("kfac_embedding_unsupported_reason", &embedding_unsupported_reason);
  m.impl("kfac_option_names", &option_names_op);
  m.impl("kfac_option_bound", &option_bound_op);
  m.impl("kfac_option_choices", &option_choices);
}

}  // namespace natgrad::kfac
