// KFACOptions, KFACParamState and their checks (see kfac_options.h).
#include "frontend/kfac_options.h"

#include "kfac/kfac_rules.h"

#include <torch/optim/serialize.h>

#include <cmath>
#include <sstream>

namespace natgrad::optim {

KFACOptions::KFACOptions(double lr) : lr_(lr) {}

double KFACOptions::get_lr() const { return lr(); }

void KFACOptions::set_lr(const double lr) { this->lr(lr); }

bool KFACOptions::pi_correction_enabled() const {
  return kfac::pi_correction_enabled(inverse_method(), pi_correction());
}

bool operator==(const KFACOptions& lhs, const KFACOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.momentum() == rhs.momentum() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.damping() == rhs.damping() &&
         lhs.factor_decay() == rhs.factor_decay() &&
         lhs.factor_update_period() == rhs.factor_update_period() &&
         lhs.inverse_update_period() == rhs.inverse_update_period() &&
         lhs.kl_clip() == rhs.kl_clip() && lhs.inverse_method() == rhs.inverse_method() &&
         lhs.pi_correction() == rhs.pi_correction() && lhs.loss_reduction() == rhs.loss_reduction();
}

namespace {

// An optional stored as an IValue (None when absent).
template <class T>
c10::IValue optional_value(const std::optional<T>& v) {
  return v.has_value() ? c10::IValue(*v) : c10::IValue();
}

}  // namespace

void KFACOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(damping);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(factor_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(factor_update_period);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(inverse_update_period);
  archive.write("kl_clip", optional_value(kl_clip()));
  archive.write("inverse_method", c10::IValue(inverse_method()));
  archive.write("pi_correction", optional_value(pi_correction()));
  archive.write("loss_reduction", c10::IValue(loss_reduction()));
}

void KFACOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, damping);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, factor_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, factor_update_period);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, inverse_update_period);
  c10::IValue v;
  archive.read("kl_clip", v);
  kl_clip(v.isNone() ? std::nullopt : std::optional<double>(v.toDouble()));
  archive.read("inverse_method", v);
  inverse_method(v.toStringRef());
  archive.read("pi_correction", v);
  pi_correction(v.isNone() ? std::nullopt : std::optional<bool>(v.toBool()));
  archive.read("loss_reduction", v);
  loss_reduction(v.toStringRef());
}

void KFACParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(kl_share);
}

void KFACParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, momentum_buffer);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, kl_share);
}

namespace {

std::string where(const char* name, std::optional<size_t> group) {
  std::ostringstream out;
  out << name;
  if (group.has_value()) out << " in param group " << *group;
  return out.str();
}

// value in [low, high] with optional open ends, finite; the message names the option.
void check_range(const char* name, double value, std::optional<size_t> group, double low,
                 bool low_open, std::optional<double> high = std::nullopt, bool high_open = false) {
  const std::string label = where(name, group);
  TORCH_CHECK(std::isfinite(value), "Invalid ", label, ": ", value, " (expected a finite number)");
  TORCH_CHECK(!(value < low || (low_open && value == low)), "Invalid ", label, ": ", value,
              " (must be ", low_open ? "> " : ">= ", low, ")");
  if (high.has_value()) {
    TORCH_CHECK(!(value > *high || (high_open && value == *high)), "Invalid ", label, ": ", value,
                " (must be ", high_open ? "< " : "<= ", *high, ")");
  }
}

}  // namespace

void check_options(const KFACOptions& o, std::optional<size_t> group) {
  check_range("lr", o.lr(), group, 0.0, false);
  check_range("momentum", o.momentum(), group, 0.0, false, 1.0, true);
  check_range("weight_decay", o.weight_decay(), group, 0.0, false);
  check_range("damping", o.damping(), group, 0.0, true);
  if (group.has_value()) return;
  check_range("factor_decay", o.factor_decay(), group, 0.0, false, 1.0, true);
  TORCH_CHECK(o.factor_update_period() >= 1,
              "Invalid factor_update_period: ", o.factor_update_period(), " (must be >= 1)");
  TORCH_CHECK(o.inverse_update_period() >= 1,
              "Invalid inverse_update_period: ", o.inverse_update_period(), " (must be >= 1)");
  if (o.kl_clip().has_value()) check_range("kl_clip", *o.kl_clip(), group, 0.0, true);
  TORCH_CHECK(o.inverse_method() == "eigen" || o.inverse_method() == "inverse",
              "Invalid inverse_method: '", o.inverse_method(), "' (expected 'eigen' or 'inverse')");
  TORCH_CHECK(o.loss_reduction() == "mean" || o.loss_reduction() == "sum" ||
                  o.loss_reduction() == "token_mean",
              "Invalid loss_reduction: '", o.loss_reduction(),
              "' (expected 'mean', 'sum' or 'token_mean')");
}

}  // namespace natgrad::optim
