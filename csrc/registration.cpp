// Every natgrad operator schema, in one place. Backend implementations register themselves
// next to their math (TORCH_LIBRARY_IMPL in each <family>/*.cpp); fake (meta) kernels for
// torch.compile and opcheck live in python/natgrad/ops/. Mutating ops declare Tensor(a!).
#include <torch/library.h>

TORCH_LIBRARY(natgrad, m) {
  // Kronecker factors (factors/kron_factors.h).
  m.def("linear_act_factor(Tensor input, bool bias) -> Tensor");
  m.def("linear_act_factor_ema_(Tensor(a!) factor, Tensor input, bool bias, float decay) -> ()");
  m.def(
      "conv2d_act_factor(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool bias) -> Tensor");
  m.def(
      "conv2d_act_factor_ema_(Tensor(a!) factor, Tensor input, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, bool bias, float decay) -> ()");
  m.def("linear_grad_factor(Tensor grad_output, float grad_scale) -> Tensor");
  m.def(
      "linear_grad_factor_ema_(Tensor(a!) factor, Tensor grad_output, float grad_scale, "
      "float decay) -> ()");
  m.def("conv2d_grad_factor(Tensor grad_output, float grad_scale) -> Tensor");
  m.def(
      "conv2d_grad_factor_ema_(Tensor(a!) factor, Tensor grad_output, float grad_scale, "
      "float decay) -> ()");
  // Every layer's A and G EMA of one K-FAC factor step, with per-layer fault flags.
  // EKFAC's diagonal in the Kronecker eigenbasis (factors/ekfac_diagonal.h).
  m.def(
      "linear_ekfac_diagonal_ema_(Tensor(a!) diagonal, Tensor input, Tensor grad_output, "
      "Tensor g_eigenvectors, Tensor a_eigenvectors, bool bias, float grad_scale, float decay) "
      "-> Tensor");
  m.def(
      "conv2d_ekfac_diagonal_ema_(Tensor(a!) diagonal, Tensor input, Tensor grad_output, "
      "Tensor g_eigenvectors, Tensor a_eigenvectors, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, bool bias, float grad_scale, float decay) -> Tensor");
  m.def(
      "embedding_ekfac_diagonal_ema_(Tensor(a!) diagonal, Tensor indices, Tensor grad_output, "
      "Tensor g_eigenvectors, float grad_scale, float decay) -> Tensor");
  m.def(
      "ekfac_rebase(Tensor eigenvalues, Tensor old_g_eigenvectors, Tensor g_eigenvectors, "
      "Tensor? old_a_eigenvectors, Tensor? a_eigenvectors) -> Tensor");
  m.def(
      "kfac_factors_ema_(Tensor(a!)[] a_factors, Tensor(b!)[] g_factors, Tensor[] inputs, "
      "Tensor[] grad_outputs, int[] layouts, float[] grad_scales, float[] decays) -> Tensor");

  // PSD linear algebra with the fallback ladder (linalg/psd_linalg.h).
  m.def(
      "damped_eigh(Tensor factor, float damping) -> "
      "(Tensor eigenvalues, Tensor eigenvectors, Tensor rung)");

  // K-FAC preconditioning (precondition/kfac_precondition.h).
  m.def(
      "kfac_precondition_eigen(Tensor grad, Tensor g_eigenvalues, Tensor g_eigenvectors, "
      "Tensor a_eigenvalues, Tensor a_eigenvectors, float damping, bool pi_correction) -> Tensor");
  m.def(
      "kfac_damped_inverses(Tensor g_factor, Tensor a_factor, float damping, "
      "bool pi_correction) -> (Tensor g_inverse, Tensor a_inverse, Tensor rung)");
  m.def(
      "kfac_precondition_ekfac(Tensor grad, Tensor g_eigenvectors, Tensor? a_eigenvectors, "
      "Tensor eigenvalues, float damping) -> Tensor");
  m.def("kfac_precondition_inverse(Tensor grad, Tensor g_inverse, Tensor a_inverse) -> Tensor");
  m.def(
      "kfac_precondition_diagonal_a(Tensor grad, Tensor a_diagonal, Tensor g_eigenvalues, "
      "Tensor g_eigenvectors, float damping, bool pi_correction) -> Tensor");

  // The per-step work of every layer at once (precondition/kfac_step.h). Trailing arguments
  // with defaults only: callers of the earlier schema keep working.
  m.def(
      "kfac_directions_eigen(Tensor[] weight_grads, Tensor?[] bias_grads, "
      "Tensor[] g_eigenvalues, Tensor[] g_eigenvectors, Tensor[] a_eigenvalues, "
      "Tensor[] a_eigenvectors, float[] damping, bool pi_correction, float grad_scale, "
      "Tensor?[]? weight_buffers=None, Tensor?[]? bias_buffers=None) -> "
      "(Tensor[] weight_directions, Tensor[] bias_directions, Tensor stats)");
  m.def(
      "kfac_directions_inverse(Tensor[] weight_grads, Tensor?[] bias_grads, "
      "Tensor[] g_inverses, Tensor[] a_inverses, float grad_scale, "
      "Tensor?[]? weight_buffers=None, Tensor?[]? bias_buffers=None) -> "
      "(Tensor[] weight_directions, Tensor[] bias_directions, Tensor stats)");
  m.def(
      "kfac_momentum_step_(Tensor(a!)[] params, Tensor(b!)[] momentum_buffers, "
      "Tensor[] directions, float lr, float momentum, float weight_decay, "
      "float direction_scale) -> ()");

  // Empirical Fisher (empirical/empirical_fisher.h).
  m.def(
      "woodbury_solve(Tensor per_sample_grads, Tensor rhs, float damping) -> "
      "(Tensor solution, Tensor rung)");
  m.def(
      "linear_diag_fisher(Tensor input, Tensor grad_output, bool bias, float grad_scale) -> "
      "Tensor");

  // Per-sample gradient rows of a layer, implicitly (empirical/layer_gram.h).
  m.def("linear_gram(Tensor input, Tensor grad_output, bool bias) -> Tensor");
  m.def("linear_rows_mv(Tensor input, Tensor grad_output, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_rows_tmv(Tensor input, Tensor grad_output, Tensor weights) -> (Tensor, Tensor)");
  m.def(
      "conv2d_gram(Tensor input, Tensor grad_output, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, bool bias) -> Tensor");
  m.def(
      "conv2d_rows_mv(Tensor input, Tensor grad_output, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "conv2d_rows_tmv(Tensor input, Tensor grad_output, Tensor weights, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor)");
  m.def("embedding_gram(Tensor indices, Tensor grad_output) -> Tensor");
  m.def("embedding_rows_mv(Tensor indices, Tensor grad_output, Tensor weight) -> Tensor");
  m.def(
      "embedding_rows_tmv(Tensor indices, Tensor grad_output, Tensor weights, "
      "int num_embeddings) -> Tensor");
  m.def("gram_solve(Tensor gram, Tensor rhs, float shift) -> (Tensor solution, Tensor rung)");

  // The K-FAC rules both frontends share (kfac/kfac_rules.h): host numbers in and out, but for
  // the statistics bound, a 0-d bool tensor (no host read).
  m.def(
      "kfac_statistics_ok(Tensor inputs, Tensor grad_outputs, int input_rows, int grad_rows, "
      "float grad_scale, ScalarType factor_dtype) -> Tensor");
  m.def("kfac_peak_bounded(Tensor peak, float count, ScalarType factor_dtype) -> Tensor");
  m.def("kfac_statistics_limit(ScalarType factor_dtype) -> float");
  m.def("kfac_linear_rows(int[] input_shape, int in_features) -> int");
  m.def(
      "kfac_conv_rows(int[] input_shape, int[] kernel_size, int[] stride, int[] padding, "
      "int[] dilation) -> int");
  m.def("kfac_embedding_rows(int[] input_shape) -> int");
  m.def("kfac_sample_scale(int samples, int rows, str loss_reduction, int batch=0) -> float");
  m.def(
      "kfac_expand_grad_scale(float grad_scale, int samples, int input_rows, int grad_rows) -> "
      "float");
  m.def("kfac_pi_correction(str inverse_method, bool? pi_correction) -> bool");
  m.def("kfac_damping(float damping, float multiplier) -> float");
  m.def(
      "kfac_adapt_damping(float multiplier, float loss_change, float model_change, float decay, "
      "int interval) -> (float multiplier, float ratio)");
  m.def(
      "kfac_quadratic_step(float a00, float a01, float a11, float b0, float b1, "
      "bool adapt_momentum, float fixed_momentum) -> (float alpha, float mu, float model_change, "
      "bool finite)");
  m.def("kfac_fsum(float[] values) -> float");
  m.def("kfac_option_names() -> str[]");
  m.def(
      "kfac_option_bound(str name) -> (float low, bool low_open, float high, bool high_open, "
      "bool integer, bool per_group)");
  m.def("kfac_option_choices(str name) -> str[]");
  m.def(
      "kfac_trust_region(float kl_clip, float[] inner, float[] cross, float[] lr, "
      "float[] momentum, float[] kl_share) -> (float nu, float[] kl_share)");
  m.def("kfac_direction_faults(float[] rows, int[] offsets) -> int[]");
  m.def("kfac_factor_faults(float[] flags) -> int[]");
  m.def("kfac_fault_message(str optimizer, int fault, str kind, str where) -> str");
  m.def("kfac_conv_unsupported_reason(int groups, str padding, str padding_mode) -> str");
  m.def("kfac_embedding_unsupported_reason(bool sparse, bool max_norm) -> str");

  // Likelihoods (likelihood/likelihood.h).
  m.def("likelihood_check_batch(Tensor inputs, Tensor? targets, str what) -> ()");
  m.def("likelihood_check_targets(str likelihood, Tensor output, Tensor target, str what) -> ()");
  m.def("likelihood_nll(str likelihood, Tensor output, Tensor target) -> Tensor");
  m.def("likelihood_sample(str likelihood, Tensor output, Generator? generator) -> Tensor");
  m.def(
      "likelihood_pseudo_targets(str likelihood, Tensor output, str fisher_type, Tensor? targets, "
      "int mc_samples, Generator? generator) -> (Tensor[] targets, Tensor? weights)");
  // EWC (ewc/ewc_penalty.h, ewc/ewc_rules.h).
  m.def("ewc_check_options(float lambda_, float gamma, str mode, str lambda_name) -> ()");
  m.def("ewc_running_mean(Tensor? old, Tensor fresh, int n, int seen) -> Tensor");
  m.def("ewc_online_merge(float gamma, Tensor old, Tensor fresh) -> Tensor");
  m.def("ewc_penalty(Tensor[] params, Tensor[] fisher, Tensor[] anchor) -> (Tensor, Tensor[])");
}
