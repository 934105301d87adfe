// The numeric rules of K-FAC that both frontends share: natgrad.KFAC (Python, through the
// torch.ops.natgrad.kfac_* ops registered from these functions) and natgrad::optim::KFAC (the
// C++ frontend, calling them directly). Each rule is written here once.
//
//   statistics bound   a layer's captured statistics are used only when every value is finite
//                      and no Gram sum of the update can overflow the factor dtype:
//                      max|t|^2 * count < finfo(factor_dtype).max / 4, with count = rows for
//                      the inputs and rows * max(grad_scale^2, 1) for the output gradients
//   rows               samples x weight-sharing positions of one forward call's input
//   sample scale       the factor that turns captured output gradients into per-sample ones
//   expand scale       the KFC ("expand") scale of a block's statistics: every position (and
//                      every extra backward pass) is a Fisher sample of its own
//   pi and damping     whether pi correction is on; the damping a step uses; the
//                      Levenberg-Marquardt adaptation of its multiplier
//   adaptive step      the learning rate and momentum that minimise the quadratic model
//   trust region       nu from the <u, g> and <b, g> the directions ops return
//   faults             the class of each fault flag, and the warning that names it
//   unsupported layers why a Conv2d or an Embedding gets no Kronecker block
//   hyperparameters    the range of every numeric hyperparameter both frontends take, which of
//                      them a param group may override, and the values of the choice options
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace natgrad::kfac {

// ---- statistics bound ----------------------------------------------------------------------

// finfo(factor_dtype).max / 4: the largest Gram sum an update may reach (floating dtypes only).
double statistics_limit(at::ScalarType factor_dtype);

// The count that multiplies max|g|^2 in the output gradients' bound:
// max(grad_rows, 1) * max(grad_scale^2, 1).
double grad_count(int64_t grad_rows, double grad_scale);

// peak * peak * count < statistics_limit(factor_dtype); false for a NaN or infinite peak.
bool within_bound(double peak, double count, at::ScalarType factor_dtype);

// max|t| as a 0-d float64 tensor on t's device: NaN if t holds one, 0 if t is empty.
at::Tensor max_abs(const at::Tensor& t);

// within_bound on a 0-d peak tensor, as a 0-d bool tensor on its device (no host read).
at::Tensor peak_bounded(const at::Tensor& peak, double count, at::ScalarType factor_dtype);

// One Kronecker factor update's bound, as a 0-d bool tensor on grad_outputs' device (no host
// read): grad_outputs within grad_count(grad_rows, grad_scale), and floating inputs (not an
// Embedding's indices) within max(input_rows, 1).
at::Tensor statistics_ok(const at::Tensor& inputs, const at::Tensor& grad_outputs,
                         int64_t input_rows, int64_t grad_rows, double grad_scale,
                         at::ScalarType factor_dtype);

// ---- rows and the sample scale -------------------------------------------------------------

// Rows of one Linear input [..., in_features]: numel / max(in_features, 1).
int64_t linear_rows(at::IntArrayRef input_shape, int64_t in_features);

// Rows of one convolution input [N, C, *spatial]: N x output positions (floor division, as
// torch's output size); an unbatched input (one dimension fewer) counts as one row. The
// convolution's dimensionality is kernel_size.size(); padding is numeric.
int64_t conv_rows(at::IntArrayRef input_shape, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation);

// Rows of one Embedding input (indices of any shape): its number of indices.
int64_t embedding_rows(at::IntArrayRef input_shape);

// The per-sample scale of captured output gradients: 1 for "sum", samples for "mean" and
// sqrt(samples * rows) for "token_mean" (a mean over every row, each row then one Fisher sample).
// batch: the step's samples (the loss's batch; 0: not known). A call whose input holds one
// sample while batch > 1 is shared by the whole batch (its input broadcast over it, as a
// position embedding fed position ids [1, T]): its output gradient is the sum of the batch's
// per-sample output gradients, whose outer product over batch estimates the Fisher (exactly in
// expectation when their mean is zero), so its scale is that of batch samples of `rows` rows
// each, divided by sqrt(batch).
double sample_scale(int64_t samples, int64_t rows, const std::string& loss_reduction,
                    int64_t batch = 0);

// The scale of a block's captured output gradients in the KFC ("expand") form: per-sample scale
// times sqrt(positions * passes), where positions = input_rows / samples (rows of the layer's
// input per sample: tokens, output pixels) and passes = grad_rows / input_rows (backward passes
// per forward row), both floor divisions by at least 1 and counted as at least 1.
double expand_grad_scale(double grad_scale, int64_t samples, int64_t input_rows, int64_t grad_rows);

// ---- pi correction and damping -------------------------------------------------------------

// Whether pi-corrected factored damping is on: `pi_correction` when given, else true exactly
// for inverse_method "inverse".
bool pi_correction_enabled(const std::string& inverse_method, std::optional<bool> pi_correction);

// The damping a step uses: a group's damping (> 0) times the adaptive multiplier (> 0).
double resolved_damping(double damping, double multiplier);

// One Levenberg-Marquardt adaptation (Martens & Grosse, 2015, section 6.5).
struct DampingAdaptation {
  double multiplier;  // the new damping multiplier, in [1e-8, 1e8]
  double ratio;       // the reduction ratio rho (-inf when the model predicts no decrease)
};

// rho = loss_change / model_change when model_change < 0, else -inf; the multiplier is
// multiplied by omega = decay^interval when rho > 3/4, divided by it when rho < 1/4, and
// clamped to [1e-8, 1e8].
DampingAdaptation adapt_damping(double multiplier, double loss_change, double model_change,
                                double decay, int64_t interval);

// ---- adaptive learning rate and momentum ---------------------------------------------------

// The coefficients of a step alpha * Delta + mu * delta that minimise the quadratic model
// (Martens & Grosse, 2015, section 7) M(w) = 1/2 w^T A w + w^T b, w = (alpha, mu), and M there.
struct QuadraticStep {
  double alpha;         // the learning rate along the proposal Delta
  double mu;            // the momentum along the previous update delta
  double model_change;  // M(alpha, mu) (<= 0 when finite)
  bool finite;          // false: an entry was NaN/Inf; alpha = mu = model_change = 0, skip the step
};

// A = [[a00, a01], [a01, a11]] = V^T (F + lambda I) V and b = [b0, b1] = V^T grad for
// V = [Delta, delta]. With adapt_momentum both coefficients are free: the 2x2 solve when A is
// positive definite (det > 1e-12 a00 a11); mu = 0 and the 1-D alpha when delta is zero (a11 <= 0,
// the first step) or parallel to Delta; alpha = 0 and the 1-D mu when Delta is zero (a00 <= 0).
// Otherwise mu = fixed_momentum and alpha = -(b0 + mu a01) / a00 (0 when a00 <= 0).
QuadraticStep quadratic_step(double a00, double a01, double a11, double b0, double b1,
                             bool adapt_momentum, double fixed_momentum);

// ---- trust region --------------------------------------------------------------------------

// The correctly rounded sum of `values` (Shewchuk's algorithm, rounded as Python's math.fsum);
// the plain sum when a value is NaN or infinite.
double fsum(at::ArrayRef<double> values);

struct TrustRegion {
  double nu;  // the step's scale, in (0, 1]
  std::vector<double>
      kl_share;  // each parameter's new share of b^T F b (store it where momentum != 0)
};

// The KL trust region on the momentum-accumulated step, from host numbers per parameter:
//   term_p = <u, g> + 2 mu <b, g> + mu^2 s_p     (s_p: its kl_share; <b, g> and s_p are 0 for a
//                                                 parameter without a momentum buffer)
//   total  = fsum(term_p * lr_p^2),   nu = min(1, sqrt(kl_clip / total)) (1 unless total > 0
//   and finite), and the new share of each parameter is term_p * nu^2.
// Without momentum this is min(1, sqrt(kl_clip / sum lr^2 <u, g>)).
TrustRegion trust_region(double kl_clip, at::ArrayRef<double> inner, at::ArrayRef<double> cross,
                         at::ArrayRef<double> lr, at::ArrayRef<double> momentum,
                         at::ArrayRef<double> kl_share);

// ---- faults --------------------------------------------------------------------------------

// What a fault flag says about a layer (or a parameter) this step.
enum class Fault : int64_t {
  kNone = 0,        // nothing: the layer moves
  kGradients = 1,   // its gradient is not finite: skipped
  kDirections = 2,  // its preconditioned gradient is not finite: skipped
  kStatistics = 3,  // its captured statistics are not finite or could overflow: factors kept
  kFactors = 4,     // its updated factors are not finite: its estimate restarts
};

// A directions stats row's class: (grad finite, direction finite), 0 meaning no.
Fault direction_fault(double grad_ok, double direction_ok);
// A factor step's flags' class: (updated, finite after the update), 0 meaning no.
Fault factor_fault(double updated, double finite);
// direction_fault of the row that starts at each offset of `rows` (as codes).
std::vector<int64_t> direction_faults(at::ArrayRef<double> rows, at::IntArrayRef offsets);
// factor_fault of each (updated, finite) pair of `flags` (length 2 x layers; as codes).
std::vector<int64_t> factor_faults(at::ArrayRef<double> flags);
// The code as a Fault (TORCH_CHECK on an unknown code).
Fault fault_of(int64_t code);
// "gradients", "preconditioned gradients", "activations or output gradients",
// "updated factors (reset)" ("" for kNone).
std::string fault_what(Fault fault);
// The warning naming a fault once: "<optimizer>: NaN or Inf (or values that would overflow) in
// the <what> of <kind> '<where>'; its update is skipped this step (parameters and factors
// untouched)"; `where` is quoted as Python's repr quotes a plain name.
std::string fault_message(const std::string& optimizer, Fault fault, const std::string& kind,
                          const std::string& where);

// ---- unsupported layers --------------------------------------------------------------------

// Why a convolution gets no Kronecker block ("" when it gets one): grouped, or padding that is
// not numeric zero padding. `padding` is written as Python writes the module's padding
// ("(1, 1)", or "'same'" with quotes for named padding); `padding_mode` is its name ("zeros").
std::string conv_unsupported_reason(int64_t groups, const std::string& padding,
                                    const std::string& padding_mode);

// Why an Embedding gets no Kronecker block ("" when it gets one).
std::string embedding_unsupported_reason(bool sparse, bool max_norm);

// ---- hyperparameters -----------------------------------------------------------------------

// The range of one numeric hyperparameter: finite, in [low, high] with optional open ends
// (high = +inf: no upper bound), a whole number when `integer` (the update periods).
struct OptionBound {
  std::string name;
  double low;
  bool low_open;
  double high;
  bool high_open;
  bool integer;
  bool per_group;  // a param group may carry its own value
};

// lr, momentum, weight_decay, damping (the per-group ones), then factor_decay,
// factor_update_period, inverse_update_period and kl_clip (checked when given), then
// adaptive_period and nll_scale (natgrad.KFAC's adaptive learning rate and momentum; not yet in
// the C++ frontend, whose options skip them).
const std::vector<OptionBound>& option_bounds();

// The entry of option_bounds() named `name` (TORCH_CHECK on an unknown name).
const OptionBound& option_bound(const std::string& name);

// The values a choice option takes: "inverse_method" ("eigen", "inverse") and
// "loss_reduction" ("mean", "sum", "token_mean") (TORCH_CHECK on an unknown name).
const std::vector<std::string>& option_choices(const std::string& name);

}  // namespace natgrad::kfac
