#include "precondition/kfac_step.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include <cmath>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/subnormal.h"
#include "precondition/kfac_precondition.h"

namespace natgrad {
namespace {

std::string at_layer(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

void check_lengths(size_t layers, std::initializer_list<std::pair<size_t, const char*>> lists) {
  for (const auto& [n, name] : lists) {
    TORCH_CHECK(n == layers, name, " must hold one entry per layer (", layers,
                " weight_grads), got ", n);
  }
}

// Validates layer i's gradients against its A-side size; returns the bias gradient or an
// undefined tensor.
at::Tensor checked_grads(const at::Tensor& w, const std::optional<at::Tensor>& bias, size_t i,
                         int64_t a_dim, int64_t g_dim, const at::Tensor& basis) {
  const std::string wn = at_layer("weight_grads", i);
  checks::floating(w, wn.c_str());
  checks::dim_eq(w, 2, wn.c_str(), "[d_out, d_in] (a Conv2d weight viewed as [C_out, -1])");
  TORCH_CHECK(w.device() == basis.device(), wn, " must be on the device of its decomposition (",
              basis.device(), "), got ", w.device());
  at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  if (b.defined()) {
    const std::string bn = at_layer("bias_grads", i);
    checks::same_device_dtype(b, w, bn.c_str(), wn.c_str());
    checks::shape_eq(b, {w.size(0)}, bn.c_str(), "[d_out] matching the weight gradient");
  }
  TORCH_CHECK(w.size(0) == g_dim && w.size(1) + (b.defined() ? 1 : 0) == a_dim, "layer ", i,
              ": the gradient [", w.size(0), ", ", w.size(1),
              b.defined() ? "] with bias" : "] without bias", " needs decompositions of sizes ",
              w.size(0), " (G side) and ", w.size(1) + (b.defined() ? 1 : 0), " (A side), got ",
              g_dim, " and ", a_dim);
  return b;
}

void check_matrix(const at::Tensor& t, const std::string& name, const at::Tensor& ref) {
  checks::floating(t, name.c_str());
  checks::square(t, name.c_str());
  TORCH_CHECK(t.dim() == 2, name, " must be a matrix, got shape ", t.sizes());
  checks::same_device_dtype(t, ref, name.c_str(), "the layer's other decomposition tensors");
}

// Inner products and finite flags of one parameter, from its scaled direction u, its gradient g
// (as passed) and its momentum buffer b (undefined: none): <u, g>, <b, g>, g finite, u finite.
struct ParamSums {
  double ug = 0.0, bg = 0.0;
  bool g_finite = true, u_finite = true;
};

// One pass over contiguous float/double data, accumulated in float64 in fixed chunks that are
// summed in order: the result does not depend on the thread count. x * 0.0 is NaN exactly when x
// is NaN or +-Inf, so the sums of g * 0 and u * 0 decide finiteness in the same pass.
template <typename T, bool kBuffer>
ParamSums fused_sums(const T* u, const T* g, const T* b, int64_t n) {
  constexpr int64_t kChunk = 1 << 14;
  constexpr int kLanes = 4;  // independent accumulators: the adds pipeline (and vectorise)
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<std::array<double, 4>> part(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double ug[kLanes] = {}, bg[kLanes] = {}, gz[kLanes] = {}, uz[kLanes] = {};
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      int64_t i = begin;
      for (; i + kLanes <= end; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double gi = g[i + l], ui = u[i + l];
          ug[l] += ui * gi;
          gz[l] += gi * 0.0;
          uz[l] += ui * 0.0;
          if constexpr (kBuffer) bg[l] += static_cast<double>(b[i + l]) * gi;
        }
      }
      for (; i < end; ++i) {
        const double gi = g[i], ui = u[i];
        ug[0] += ui * gi;
        gz[0] += gi * 0.0;
        uz[0] += ui * 0.0;
        if constexpr (kBuffer) bg[0] += static_cast<double>(b[i]) * gi;
      }
      auto total = [](const double* x) { return (x[0] + x[1]) + (x[2] + x[3]); };
      part[static_cast<size_t>(c)] = {total(ug), total(bg), total(gz), total(uz)};
    }
  });
  ParamSums out;
  double gz = 0.0, uz = 0.0;
  for (const auto& p : part) {
    out.ug += p[0];
    out.bg += p[1];
    gz += p[2];
    uz += p[3];
  }
  out.g_finite = std::isfinite(gz);
  out.u_finite = std::isfinite(uz);
  return out;
}

// ParamSums of a CPU parameter: the fused pass for float32/float64, ATen reductions (read back
// on the host, which costs nothing on CPU) for other dtypes.
ParamSums host_sums(const at::Tensor& u, const at::Tensor& g, const at::Tensor& b) {
  const at::ScalarType t = g.scalar_type();
  if ((t == at::kFloat || t == at::kDouble) && u.scalar_type() == t &&
      (!b.defined() || b.scalar_type() == t)) {
    const at::Tensor uc = u.contiguous(), gc = g.contiguous();
    const at::Tensor bc = b.defined() ? b.contiguous() : at::Tensor();
    ParamSums out;
    AT_DISPATCH_FLOATING_TYPES(t, "kfac_directions_sums", [&] {
      const scalar_t *pu = uc.const_data_ptr<scalar_t>(), *pg = gc.const_data_ptr<scalar_t>();
      out = bc.defined()
                ? fused_sums<scalar_t, true>(pu, pg, bc.const_data_ptr<scalar_t>(), g.numel())
                : fused_sums<scalar_t, false>(pu, pg, nullptr, g.numel());
    });
    return out;
  }
  ParamSums out;
  out.ug = at::mul(u, g).sum(at::kDouble).item<double>();
  if (b.defined()) out.bg = at::mul(b, g).sum(at::kDouble).item<double>();
  out.g_finite = checks::finite_flag(g).item<bool>();
  out.u_finite = checks::finite_flag(u).item<bool>();
  return out;
}

// The stats rows of every layer: host doubles when every layer is on the CPU (one tensor made at
// the end), else a row of 0-d float64 tensors per layer (nothing is read back off the device).
struct StatsRows {
  bool host;
  int64_t width;  // 4, or 6 with momentum buffers
  std::vector<double> values;
  std::vector<at::Tensor> rows;

  at::Tensor finish(size_t layers) {
    if (host || rows.empty()) {
      values.resize(layers * static_cast<size_t>(width), 0.0);
      return at::tensor(values, at::TensorOptions().dtype(at::kDouble))
          .view({static_cast<int64_t>(layers), width});
    }
    return at::stack(rows);
  }
};

// One layer's contribution to `out`: directions (scaled, flushed, in the gradient's dtype) and
// its stats row [grad finite, direction finite, <u_w, g_w>, <u_b, g_b> (, <b_w, g_w>, <b_b, g_b>)].
void finish_layer(KfacDirections& out, StatsRows& stats, const at::Tensor& w, const at::Tensor& b,
                  at::Tensor dw, at::Tensor db, const at::Tensor& extra_finite, double grad_scale,
                  const at::Tensor& bw, const at::Tensor& bb) {
  dw = dw.to(w.scalar_type());
  if (grad_scale != 1.0) dw.mul_(grad_scale);
  flush_subnormal_(dw);
  if (b.defined()) {
    db = db.to(b.scalar_type());
    if (grad_scale != 1.0) db.mul_(grad_scale);
    flush_subnormal_(db);
  }
  // dw is already s u and the products are rescaled by s: <s u, s g> = s <dw, g>, <b, s g> = s <b,
  // g>.
  if (stats.host) {
    const ParamSums sw = host_sums(dw, w, bw);
    const ParamSums sb = b.defined() ? host_sums(db, b, bb) : ParamSums{};
    const bool dir_ok =
        sw.u_finite && sb.u_finite && (!extra_finite.defined() || extra_finite.item<bool>());
    const double row[6] = {sw.g_finite && sb.g_finite ? 1.0 : 0.0,
                           dir_ok ? 1.0 : 0.0,
                           sw.ug * grad_scale,
                           sb.ug * grad_scale,
                           sw.bg * grad_scale,
                           sb.bg * grad_scale};
    stats.values.insert(stats.values.end(), row, row + stats.width);
  } else {
    at::Tensor grad_ok = checks::finite_flag(w);
    at::Tensor dir_ok = checks::finite_flag(dw);
    if (extra_finite.defined()) dir_ok = dir_ok.logical_and(extra_finite);
    auto inner = [&](const at::Tensor& x, const at::Tensor& g) {
      return x.defined() && g.defined() ? at::mul(x, g).sum(at::kDouble).mul_(grad_scale)
                                        : at::zeros({}, w.options().dtype(at::kDouble));
    };
    if (b.defined()) {
      grad_ok = grad_ok.logical_and(checks::finite_flag(b));
      dir_ok = dir_ok.logical_and(checks::finite_flag(db));
    }
    std::vector<at::Tensor> row{grad_ok.to(at::kDouble), dir_ok.to(at::kDouble), inner(dw, w),
                                inner(db, b)};
    if (stats.width == 6) {
      row.push_back(inner(bw, w));
      row.push_back(inner(bb, b));
    }
    stats.rows.push_back(at::stack(row));
  }
  if (b.defined()) out.bias.push_back(db);
  out.weight.push_back(dw);
}

at::Tensor optional_at(const OptionalTensors& list, size_t i) {
  if (i >= list.size()) return at::Tensor();
  const std::optional<at::Tensor> t = list.get(i);
  return t.has_value() ? *t : at::Tensor();
}

// Validates the momentum buffers against the gradients (see kfac_step.h).
void check_buffers(at::TensorList weight_grads, const OptionalTensors& bias_grads,
                   const OptionalTensors& weight_buffers, const OptionalTensors& bias_buffers) {
  const size_t layers = weight_grads.size();
  if (weight_buffers.empty()) {
    TORCH_CHECK(bias_buffers.empty(), "bias_buffers needs weight_buffers (one entry per layer, ",
                "None where a layer has no momentum buffer yet)");
    return;
  }
  check_lengths(layers, {{weight_buffers.size(), "weight_buffers"}});
  TORCH_CHECK(bias_buffers.empty() || bias_buffers.size() == layers,
              "bias_buffers must be empty or hold one entry per layer (", layers,
              " weight_grads), got ", bias_buffers.size());
  for (size_t i = 0; i < layers; ++i) {
    const at::Tensor bw = optional_at(weight_buffers, i), bb = optional_at(bias_buffers, i);
    const at::Tensor b = optional_at(bias_grads, i);
    const std::string wn = at_layer("weight_buffers", i), bn = at_layer("bias_buffers", i);
    if (bw.defined()) {
      checks::same_device_dtype(bw, weight_grads[i], wn.c_str(), "its weight gradient");
      checks::shape_eq(bw, weight_grads[i].sizes(), wn.c_str(), "shaped like its weight gradient");
    }
    if (bb.defined()) {
      TORCH_CHECK(b.defined(), bn, " is given but layer ", i, " has no bias gradient");
      checks::same_device_dtype(bb, b, bn.c_str(), "its bias gradient");
      checks::shape_eq(bb, b.sizes(), bn.c_str(), "shaped like its bias gradient");
    }
  }
}

// Runs `layer(i, w, b)` -> (dw, db, extra finite flag or undefined) for every layer and collects
// the directions and stats rows.
template <class LayerFn>
KfacDirections for_each_layer(at::TensorList weight_grads, const OptionalTensors& bias_grads,
                              double grad_scale, const OptionalTensors& weight_buffers,
                              const OptionalTensors& bias_buffers, LayerFn layer) {
  KfacDirections out;
  bool host = true;
  for (const at::Tensor& w : weight_grads) host = host && w.device().is_cpu();
  StatsRows stats{host, weight_buffers.empty() ? 4 : 6, {}, {}};
  for (size_t i = 0; i < weight_grads.size(); ++i) {
    const at::Tensor& w = weight_grads[i];
    const at::Tensor b = optional_at(bias_grads, i);
    auto [dw, db, extra_finite] = layer(i, w, b);
    finish_layer(out, stats, w, b, dw, db, extra_finite, grad_scale, optional_at(weight_buffers, i),
                 optional_at(bias_buffers, i));
  }
  out.stats = stats.finish(weight_grads.size());
  return out;
}

}  // namespace

KfacDirections kfac_directions_eigen(at::TensorList weight_grads,
                                     const c10::List<std::optional<at::Tensor>>& bias_grads,
                                     at::TensorList g_eigenvalues, at::TensorList g_eigenvectors,
                                     at::TensorList a_eigenvalues, at::TensorList a_eigenvectors,
                                     at::ArrayRef<double> damping, bool pi_correction,
                                     double grad_scale, const OptionalTensors& weight_buffers,
                                     const OptionalTensors& bias_buffers) {
  const size_t layers = weight_grads.size();
  check_lengths(layers, {{bias_grads.size(), "bias_grads"},
                         {g_eigenvalues.size(), "g_eigenvalues"},
                         {g_eigenvectors.size(), "g_eigenvectors"},
                         {a_eigenvalues.size(), "a_eigenvalues"},
                         {a_eigenvectors.size(), "a_eigenvectors"},
                         {damping.size(), "damping"}});
  checks::grad_scale(grad_scale);
  for (size_t i = 0; i < layers; ++i) {
    check_matrix(g_eigenvectors[i], at_layer("g_eigenvectors", i), g_eigenvectors[i]);
    check_matrix(a_eigenvectors[i], at_layer("a_eigenvectors", i), g_eigenvectors[i]);
    checks::same_device_dtype(g_eigenvalues[i], g_eigenvectors[i],
                              at_layer("g_eigenvalues", i).c_str(), "g_eigenvectors");
    checks::same_device_dtype(a_eigenvalues[i], g_eigenvectors[i],
                              at_layer("a_eigenvalues", i).c_str(), "g_eigenvectors");
    checks::shape_eq(g_eigenvalues[i], {g_eigenvectors[i].size(0)},
                     at_layer("g_eigenvalues", i).c_str(), "one per eigenvector");
    checks::shape_eq(a_eigenvalues[i], {a_eigenvectors[i].size(0)},
                     at_layer("a_eigenvalues", i).c_str(), "one per eigenvector");
    checks::damping(damping[i], /*strictly_positive=*/false);
    checked_grads(weight_grads[i], bias_grads.get(i), i, a_eigenvectors[i].size(0),
                  g_eigenvectors[i].size(0), g_eigenvectors[i]);
  }
  check_buffers(weight_grads, bias_grads, weight_buffers, bias_buffers);
  auto layer = [&](size_t i, const at::Tensor& w, const at::Tensor& b) {
    const at::Tensor &vg = g_eigenvectors[i], &va = a_eigenvectors[i];
    const at::Tensor &lg = g_eigenvalues[i], &la = a_eigenvalues[i];
    const int64_t n = w.size(1);
    const at::Tensor va_w = va.narrow(0, 0, n);  // rows of V_A that multiply the weight columns
    // V_G^T [W | b] V_A = V_G^T (W V_A[:n] + b (x) V_A[n]): the bias column as a rank-1 term.
    at::Tensor t = without_subnormals(w.to(va.scalar_type())).mm(va_w);
    if (b.defined()) t.addr_(without_subnormals(b.to(va.scalar_type())), va.select(0, n));
    at::Tensor rotated = vg.t().mm(t);
    at::Tensor denom;
    if (pi_correction) {
      // Martens & Grosse: A + pi sqrt(damping) I, G + sqrt(damping) / pi I (as
      // kfac_precondition_eigen)
      const at::Tensor pi = pi_from_traces(la.mean(), lg.mean());
      const double root = std::sqrt(damping[i]);
      denom = (lg + root / pi).unsqueeze(1) * (la + pi * root).unsqueeze(0);
    } else {
      denom = at::outer(lg, la).add_(damping[i]);
    }
    // As in kfac_precondition_eigen: a zero denominator leaves the coordinate unscaled, and
    // the denominator's own finiteness joins the direction's.
    const at::Tensor denom_ok = checks::finite_flag(denom);
    denom.masked_fill_(denom <= 0, 1.0);
    rotated.div_(denom);
    const at::Tensor y = vg.mm(rotated);  // [d_out, d_in (+1)] in the eigenbasis of A
    at::Tensor db = b.defined() ? y.mv(va.select(0, n)) : at::Tensor();
    return std::make_tuple(y.mm(va_w.t()), db, denom_ok);
  };
  return for_each_layer(weight_grads, bias_grads, grad_scale, weight_buffers, bias_buffers, layer);
}

KfacDirections kfac_directions_inverse(at::TensorList weight_grads,
                                       const c10::List<std::optional<at::Tensor>>& bias_grads,
                                       at::TensorList g_inverses, at::TensorList a_inverses,
                                       double grad_scale, const OptionalTensors& weight_buffers,
                                       const OptionalTensors& bias_buffers) {
  const size_t layers = weight_grads.size();
  check_lengths(layers, {{bias_grads.size(), "bias_grads"},
                         {g_inverses.size(), "g_inverses"},
                         {a_inverses.size(), "a_inverses"}});
  checks::grad_scale(grad_scale);
  for (size_t i = 0; i < layers; ++i) {
    check_matrix(g_inverses[i], at_layer("g_inverses", i), g_inverses[i]);
    check_matrix(a_inverses[i], at_layer("a_inverses", i), g_inverses[i]);
    checked_grads(weight_grads[i], bias_grads.get(i), i, a_inverses[i].size(0),
                  g_inverses[i].size(0), g_inverses[i]);
  }
  check_buffers(weight_grads, bias_grads, weight_buffers, bias_buffers);
  auto layer = [&](size_t i, const at::Tensor& w, const at::Tensor& b) {
    const at::Tensor &gi = g_inverses[i], &ai = a_inverses[i];
    const int64_t n = w.size(1);
    // G^-1 [W | b] A^-1, blockwise in A^-1 = [[A_ww, a_wb], [a_bw, a_bb]].
    const at::Tensor gw = gi.mm(without_subnormals(w.to(gi.scalar_type())));
    at::Tensor dw = gw.mm(ai.narrow(0, 0, n).narrow(1, 0, n));
    at::Tensor db;
    if (b.defined()) {
      const at::Tensor gb = gi.mv(without_subnormals(b.to(gi.scalar_type())));
      dw.addr_(gb, ai.select(0, n).narrow(0, 0, n));
      db = gw.mv(ai.select(1, n).narrow(0, 0, n)).add_(gb * ai.select(0, n).select(0, n));
    }
    return std::make_tuple(dw, db, at::Tensor());
  };
  return for_each_layer(weight_grads, bias_grads, grad_scale, weight_buffers, bias_buffers, layer);
}

void kfac_momentum_step_(at::TensorList params, at::TensorList momentum_buffers,
                         at::TensorList directions, double lr, double momentum, double weight_decay,
                         double direction_scale) {
  TORCH_CHECK(directions.size() == params.size(), "directions must hold one entry per parameter (",
              params.size(), " params), got ", directions.size());
  TORCH_CHECK(momentum_buffers.empty() || momentum_buffers.size() == params.size(),
              "momentum_buffers must be empty (no momentum) or hold one entry per parameter (",
              params.size(), "), got ", momentum_buffers.size());
  TORCH_CHECK(!momentum_buffers.empty() || momentum == 0.0, "momentum ", momentum,
              " needs momentum_buffers (zeros before the first step)");
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(momentum) && std::isfinite(weight_decay) &&
                  std::isfinite(direction_scale),
              "lr, momentum, weight_decay and direction_scale must be finite, got ", lr, ", ",
              momentum, ", ", weight_decay, ", ", direction_scale);
  for (size_t i = 0; i < params.size(); ++i) {
    checks::floating(params[i], at_layer("params", i).c_str());
    checks::same_device_dtype(directions[i], params[i], at_layer("directions", i).c_str(),
                              "its parameter");
    checks::shape_eq(directions[i], params[i].sizes(), at_layer("directions", i).c_str(),
                     "shaped like its parameter");
    if (!momentum_buffers.empty()) {
      checks::same_device_dtype(momentum_buffers[i], params[i],
                                at_layer("momentum_buffers", i).c_str(), "its parameter");
      checks::shape_eq(momentum_buffers[i], params[i].sizes(),
                       at_layer("momentum_buffers", i).c_str(), "shaped like its parameter");
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i];
    at::Tensor d = direction_scale != 1.0 ? directions[i] * direction_scale : directions[i];
    if (weight_decay != 0.0) d = at::add(d, p, weight_decay);
    if (momentum_buffers.empty()) {
      p.sub_(d, lr);
      continue;
    }
    at::Tensor buf = momentum_buffers[i];
    buf.mul_(momentum).add_(d);
    flush_subnormal_(buf);
    p.sub_(buf, lr);
  }
}

namespace {

// The schema's Tensor?[]? (None: no momentum buffers) as the C++ API's list.
OptionalTensors or_empty(const std::optional<OptionalTensors>& list) {
  return list.has_value() ? *list : OptionalTensors();
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> as_tuple(
    KfacDirections d) {
  return {std::move(d.weight), std::move(d.bias), std::move(d.stats)};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> directions_eigen_op(
    at::TensorList weight_grads, const c10::List<std::optional<at::Tensor>>& bias_grads,
    at::TensorList g_eigenvalues, at::TensorList g_eigenvectors, at::TensorList a_eigenvalues,
    at::TensorList a_eigenvectors, at::ArrayRef<double> damping, bool pi_correction,
    double grad_scale, const std::optional<OptionalTensors>& weight_buffers,
    const std::optional<OptionalTensors>& bias_buffers) {
  return as_tuple(kfac_directions_eigen(
      weight_grads, bias_grads, g_eigenvalues, g_eigenvectors, a_eigenvalues, a_eigenvectors,
      damping, pi_correction, grad_scale, or_empty(weight_buffers), or_empty(bias_buffers)));
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> directions_inverse_op(
    at::TensorList weight_grads, const c10::List<std::optional<at::Tensor>>& bias_grads,
    at::TensorList g_inverses, at::TensorList a_inverses, double grad_scale,
    const std::optional<OptionalTensors>& weight_buffers,
    const std::optional<OptionalTensors>& bias_buffers) {
  return as_tuple(kfac_directions_inverse(weight_grads, bias_grads, g_inverses, a_inverses,
                                          grad_scale, or_empty(weight_buffers),
                                          or_empty(bias_buffers)));
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, CompositeExplicitAutograd, m) {
  m.impl("kfac_directions_eigen", &directions_eigen_op);
  m.impl("kfac_directions_inverse", &directions_inverse_op);
  m.impl("kfac_momentum_step_", &kfac_momentum_step_);
}

}  // namespace natgrad
