// natgrad::optim::KFAC: set-up and the step (see kfac.h). The policy is natgrad.KFAC's
// (python/natgrad/optim/kfac.py); the numeric rules are kfac/kfac_rules.h's.
#include "frontend/kfac.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/nn/modules/container/any.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "frontend/kfac_util.h"
#include "precondition/kfac_step.h"

namespace natgrad::optim {

using detail::KroneckerBlock;

namespace {

std::unique_ptr<torch::optim::OptimizerOptions> checked(const KFACOptions& defaults) {
  check_options(defaults);
  return std::make_unique<KFACOptions>(defaults);
}

std::vector<torch::Tensor> parameters_of(const std::shared_ptr<torch::nn::Module>& model) {
  TORCH_CHECK(model != nullptr, "Invalid model: expected a torch::nn::Module, got nullptr");
  return model->parameters();
}

}  // namespace

KFAC::KFAC(std::shared_ptr<torch::nn::Module> model, const KFACOptions& defaults)
    : KFAC(model, {torch::optim::OptimizerParamGroup(parameters_of(model))}, defaults) {}

KFAC::KFAC(std::shared_ptr<torch::nn::Module> model,
           const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
           const KFACOptions& defaults)
    : torch::optim::Optimizer(param_groups, checked(defaults)) {
  TORCH_CHECK(model != nullptr, "Invalid model: expected a torch::nn::Module, got nullptr");
  // torch::optim's add_param_group replaces options of optimizer types it does not know by
  // the defaults: a group's own KFACOptions are put back (and checked) here.
  for (size_t i = 0; i < param_groups.size(); ++i) restore_group_options(i, param_groups[i]);
  index_groups();  // every group holds KFACOptions
  build(model);
}

void KFAC::restore_group_options(size_t index, const torch::optim::OptimizerParamGroup& group) {
  if (group.has_options()) {
    const auto* own = dynamic_cast<const KFACOptions*>(&group.options());
    TORCH_CHECK(own != nullptr, "param group ", index,
                " of natgrad::optim::KFAC must hold KFACOptions");
    this->param_groups()[index].set_options(group.options().clone());
  }
  check_options(static_cast<const KFACOptions&>(this->param_groups()[index].options()), index);
}

void KFAC::add_param_group(const torch::optim::OptimizerParamGroup& param_group) {
  torch::optim::Optimizer::add_param_group(param_group);
  try {
    restore_group_options(param_groups().size() - 1, param_group);
  } catch (...) {
    param_groups().pop_back();  // an invalid group is not added (as natgrad.KFAC)
    throw;
  }
  index_groups();
}

KFAC::~KFAC() { remove_hooks(); }

void KFAC::remove_hooks() {
  for (size_t i = 0; i < blocks_.size() && i < records_.size(); ++i) {
    blocks_[i]->layer().detach(records_[i]);
    records_[i]->clear();
  }
}

const KFACOptions& KFAC::global() const { return static_cast<const KFACOptions&>(defaults()); }

void KFAC::index_groups() {
  group_of_.clear();
  for (size_t i = 0; i < param_groups().size(); ++i) {
    auto& group = param_groups()[i];
    TORCH_CHECK(group.has_options() && dynamic_cast<const KFACOptions*>(&group.options()),
                "param group ", i, " of natgrad::optim::KFAC must hold KFACOptions");
    for (const auto& p : group.params()) group_of_[p.unsafeGetTensorImpl()] = i;
  }
}

const KFACOptions& KFAC::group_options(const torch::Tensor& p) const {
  if (!p.defined()) return global();
  auto it = group_of_.find(p.unsafeGetTensorImpl());
  TORCH_INTERNAL_ASSERT(it != group_of_.end(), "parameter outside every param group");
  return static_cast<const KFACOptions&>(param_groups()[it->second].options());
}

KFACParamState& KFAC::param_state(const torch::Tensor& p) {
  auto& slot = state()[p.unsafeGetTensorImpl()];
  if (!slot) slot = std::make_unique<KFACParamState>();
  return static_cast<KFACParamState&>(*slot);
}

void KFAC::build(const std::shared_ptr<torch::nn::Module>& model) {
  std::set<const void*> managed;
  for (const auto& group : param_groups()) {
    for (const auto& p : group.params()) managed.insert(p.unsafeGetTensorImpl());
  }
  for (const auto& item : model->named_parameters())
    names_[item.value().unsafeGetTensorImpl()] = item.key();
  std::set<const torch::nn::Module*> seen;  // a module registered twice is visited once
  for (const auto& item : model->named_modules()) {
    const std::string& name = item.key();
    const std::shared_ptr<torch::nn::Module>& module = item.value();
    if (!seen.insert(module.get()).second) continue;
    const std::string owner = detail::type_name(*module) + " '" + name + "'";
    std::vector<torch::Tensor> own;
    for (const auto& p : module->parameters(/*recurse=*/false)) {
      if (p.requires_grad()) {
        own.push_back(p);
      } else {
        fallback_reason_[p.unsafeGetTensorImpl()] =
            owner + ": frozen (requires_grad=False) when natgrad::optim::KFAC was built";
      }
    }
    std::vector<torch::Tensor> listed;
    for (const auto& p : own) {
      if (managed.count(p.unsafeGetTensorImpl())) listed.push_back(p);
    }
    if (listed.empty()) continue;
    std::string reason = "not a natgrad::nn capture layer (Linear, Conv2d, Embedding)";
    if (nn::as_capture_layer(*module) != nullptr) {
      auto unsupported = KroneckerBlock::unsupported_reason(*module);
      if (unsupported.has_value()) {
        reason = *unsupported;
      } else {
        auto block = std::make_unique<KroneckerBlock>(name, module);
        const auto covered = block->params();
        bool same = covered.size() == listed.size() && covered.size() == own.size();
        for (size_t i = 0; same && i < covered.size(); ++i) same = covered[i].is_same(listed[i]);
        if (same) {
          for (const auto& p : covered) block_of_[p.unsafeGetTensorImpl()] = blocks_.size();
          auto records = std::make_shared<nn::LayerRecords>([this] { return capturing(); });
          block->layer().attach(records);
          records_.push_back(records);
          blocks_.push_back(std::move(block));
          continue;
        }
        reason = "only some of its parameters are optimized";
      }
    }
    for (const auto& p : own) fallback_reason_[p.unsafeGetTensorImpl()] = owner + ": " + reason;
  }
}

bool KFAC::capturing() const {  // (a period edited to < 1 is rejected by the next step())
  return steps_ % std::max<int64_t>(global().factor_update_period(), 1) == 0;
}

void KFAC::clear_records() {
  for (auto& records : records_) records->clear();
}

std::string KFAC::param_name(const torch::Tensor& p) const {
  auto it = names_.find(p.unsafeGetTensorImpl());
  return it == names_.end() ? "<unnamed>" : it->second;
}

std::string KFAC::plain_reason(const torch::Tensor& p) const {
  auto it = fallback_reason_.find(p.unsafeGetTensorImpl());
  return it == fallback_reason_.end() ? "not owned by any module" : it->second;
}

void KFAC::fault(const std::string& where, kfac::Fault what, const std::string& kind) {
  if (!faults_.count(where))
    TORCH_WARN(kfac::fault_message("natgrad::optim::KFAC", what, kind, where));
  faults_[where] += 1;
}

double KFAC::damping_of(const torch::Tensor& p) const {
  return kfac::resolved_damping(group_options(p).damping(), 1.0);  // no adaptive multiplier here
}

torch::Tensor KFAC::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  torch::NoGradGuard no_grad;
  const int64_t k = steps_;
  try {
    index_groups();
    check_options(global());
    for (size_t i = 0; i < param_groups().size(); ++i) {
      check_options(static_cast<const KFACOptions&>(param_groups()[i].options()), i);
    }
  } catch (...) {
    clear_records();
    throw;
  }
  const std::set<std::string> skipped = update_factors(k);
  update_inverses(k);
  std::vector<Direction> updates = directions(skipped);
  const double nu = trust_region(updates);
  apply(updates, nu);
  steps_ += 1;
  return loss;
}

std::set<std::string> KFAC::update_factors(int64_t k) {
  std::set<std::string> skipped;
  if (k % global().factor_update_period() != 0) {
    clear_records();
    return skipped;
  }
  std::vector<std::pair<size_t, detail::KroneckerStatistics>> pending;
  std::vector<torch::Tensor> checks;
  std::vector<std::vector<torch::Tensor>> inputs(blocks_.size()), grads(blocks_.size());
  int64_t batch = 0;  // the step's samples: the most any layer saw (kfac::sample_scale)
  for (size_t i = 0; i < blocks_.size(); ++i) {
    for (const auto& call : records_[i]->complete()) {
      if (blocks_[i]->count_samples({call->input}) == 0) continue;  // an empty batch holds nothing
      inputs[i].push_back(call->input);
      grads[i].push_back(call->grad_output);
    }
    if (!inputs[i].empty()) batch = std::max(batch, blocks_[i]->count_samples(inputs[i]));
  }
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const KroneckerBlock& block = *blocks_[i];
    if (inputs[i].empty()) continue;
    const double per_sample = block.sample_scale(inputs[i], global().loss_reduction(), batch);
    pending.emplace_back(i, block.prepare(inputs[i], grads[i], per_sample));
    checks.push_back(block.statistics_ok(pending.back().second));
  }
  const std::vector<bool> ok = detail::all_true(checks);
  std::vector<size_t> updated;
  for (size_t j = 0; j < pending.size(); ++j) {
    KroneckerBlock& block = *blocks_[pending[j].first];
    const kfac::Fault what = kfac::factor_fault(ok[j] ? 1.0 : 0.0, 1.0);
    if (what == kfac::Fault::kNone) {
      block.apply_update(pending[j].second, global().factor_decay());
      updated.push_back(pending[j].first);
    } else {  // NaN/Inf or overflow: keep the factors, skip the layer
      skipped.insert(block.name());
      fault(block.name(), what);
    }
  }
  clear_records();
  // Unreachable given the bound above; should a factor still turn non-finite, the layer
  // restarts its estimate (and skips this step) rather than keep poisoned factors.
  std::vector<torch::Tensor> healthy;
  for (size_t i : updated) {
    auto& s = blocks_[i]->state;
    healthy.push_back(
        torch::isfinite(torch::stack({kfac::max_abs(s.at("A")), kfac::max_abs(s.at("G"))})).all());
  }
  const std::vector<bool> fine = detail::all_true(healthy);
  for (size_t j = 0; j < updated.size(); ++j) {
    const kfac::Fault what = kfac::factor_fault(1.0, fine[j] ? 1.0 : 0.0);
    if (what == kfac::Fault::kNone) continue;
    KroneckerBlock& block = *blocks_[updated[j]];
    block.state.clear();
    decomposed_.erase(block.name());
    skipped.insert(block.name());
    fault(block.name(), what);
  }
  return skipped;
}

void KFAC::update_inverses(int64_t k) {
  const int64_t period = global().inverse_update_period();
  std::vector<KroneckerBlock*> due;
  bool fresh = false;
  for (auto& block : blocks_) {
    const bool is_new = !decomposed_.count(block->name());
    if (block->has_factors() && (k % period == 0 || is_new)) {
      due.push_back(block.get());
      fresh = fresh || is_new;
    }
  }
  if (fresh) {  // a new layer: every layer with factors is decomposed (as natgrad.KFAC)
    due.clear();
    for (auto& block : blocks_) {
      if (block->has_factors()) due.push_back(block.get());
    }
  }
  for (KroneckerBlock* block : due) {
    decomposed_.insert(block->name());
    const int64_t rung = block->update_inverse(
        global().inverse_method(), damping_of(block->weight()), global().pi_correction_enabled());
    if (rung > 0) {
      const bool first = !ladder_.count(block->name());
      ladder_[block->name()] += 1;
      if (first) {
        TORCH_WARN("natgrad::optim::KFAC: decomposing the factors of '", block->name(),
                   "' needed fallback-ladder rung ", rung, "; see natgrad::Rung (linalg/ladder.h)");
      }
    }
  }
}

}  // namespace natgrad::optim
