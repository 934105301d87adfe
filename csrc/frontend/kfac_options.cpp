// KFACOptions, KFACParamState and their checks (see kfac_options.h).
#include "frontend/kfac_options.h"

#include "kfac/kfac_rules.h"

#include <torch/optim/serialize.h>

#include <algorithm>
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

std::string where(const std::string& name, std::optional<size_t> group) {
  std::ostringstream out;
  out << name;
  if (group.has_value()) out << " in param group " << *group;
  return out.str();
}

// kfac::option_bound(name)'s range, finite (a whole number for the periods); the message names
// the option.
void check_range(const std::string& name, double value, std::optional<size_t> group) {
  const kfac::OptionBound& b = kfac::option_bound(name);
  const std::string label = where(name, group);
  TORCH_CHECK(std::isfinite(value), "Invalid ", label, ": ", value, " (expected a finite number)");
  TORCH_CHECK(!b.integer || value == std::floor(value), "Invalid ", label, ": ", value,
              " (expected a whole number)");
  TORCH_CHECK(!(value < b.low || (b.low_open && value == b.low)), "Invalid ", label, ": ", value,
              " (must be ", b.low_open ? "> " : ">= ", b.low, ")");
  TORCH_CHECK(!(value > b.high || (b.high_open && value == b.high)), "Invalid ", label, ": ",
              value, " (must be ", b.high_open ? "< " : "<= ", b.high, ")");
}

void check_choice(const std::string& name, const std::string& value) {
  const auto& choices = kfac::option_choices(name);
  if (std::find(choices.begin(), choices.end(), value) != choices.end()) return;
  std::ostringstream expected;
  for (size_t i = 0; i < choices.size(); ++i) {
    expected << (i == 0 ? "'" : i + 1 == choices.size() ? " or '" : ", '") << choices[i] << "'";
  }
  TORCH_CHECK(false, "Invalid ", name, ": '", value, "' (expected ", expected.str(), ")");
}

// The value of one numeric option by its kfac::option_bounds() name (kl_clip when given).
std::optional<double> option_value(const KFACOptions& o, const std::string& name) {
  if (name == "lr") return o.lr();
  if (name == "momentum") return o.momentum();
  if (name == "weight_decay") return o.weight_decay();
  if (name == "damping") return o.damping();
  if (name == "factor_decay") return o.factor_decay();
  if (name == "factor_update_period") return static_cast<double>(o.factor_update_period());
  if (name == "inverse_update_period") return static_cast<double>(o.inverse_update_period());
  if (name == "adaptive_period" || name == "nll_scale") {
    return std::nullopt;  // the adaptive step: Python frontend only
  }
  TORCH_CHECK(name == "kl_clip", "KFACOptions has no option named '", name, "'");
  return o.kl_clip();
}

}  // namespace

void check_options(const KFACOptions& o, std::optional<size_t> group) {
  for (const auto& bound : kfac::option_bounds()) {
    if (group.has_value() && !bound.per_group) continue;
    const std::optional<double> value = option_value(o, bound.name);
    if (value.has_value()) check_range(bound.name, *value, group);
  }
  if (group.has_value()) return;
  check_choice("inverse_method", o.inverse_method());
  check_choice("loss_reduction", o.loss_reduction());
}

}  // namespace natgrad::optim
