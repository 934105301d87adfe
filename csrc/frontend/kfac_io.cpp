// natgrad::optim::KFAC's introspection and checkpoints: describe() (the table of
// python/natgrad/optim/_kfac_io.py's describe) and save/load through torch::serialize archives
// (torch::optim's state and param groups, plus the "kfac" entry: counters, faults, ladder,
// decomposed layers, every block's factors and decompositions; validated before loading).
#include <c10/util/Exception.h>
#include <torch/optim/serialize.h>

#include <sstream>

#include "frontend/kfac.h"
#include "frontend/kfac_util.h"

namespace natgrad::optim {

using detail::KroneckerBlock;

namespace {

std::string shape_text(const torch::Tensor& p) {
  if (p.dim() == 0) return "scalar";
  std::ostringstream out;
  for (int64_t i = 0; i < p.dim(); ++i) out << (i ? "x" : "") << p.size(i);
  return out.str();
}

std::string padded(const std::string& s, size_t width) {
  return s + std::string(width > s.size() ? width - s.size() : 0, ' ');
}

const char* kind_name(KroneckerBlock::Kind kind) {
  switch (kind) {
    case KroneckerBlock::Kind::kLinear:
      return "linear";
    case KroneckerBlock::Kind::kConv2d:
      return "conv2d";
    default:
      return "embedding";
  }
}

c10::Dict<std::string, int64_t> to_dict(const std::map<std::string, int64_t>& m) {
  c10::Dict<std::string, int64_t> d;
  for (const auto& [k, v] : m) d.insert(k, v);
  return d;
}

std::map<std::string, int64_t> from_dict(const c10::IValue& v, const char* what) {
  TORCH_CHECK(v.isGenericDict(), "natgrad::optim::KFAC::load: kfac/", what, " must be a dict");
  std::map<std::string, int64_t> m;
  for (const auto& item : v.toGenericDict()) m[item.key().toStringRef()] = item.value().toInt();
  return m;
}

}  // namespace

std::string KFAC::describe() const {
  std::vector<std::array<std::string, 3>> rows;
  for (const auto& group : param_groups()) {
    for (const auto& p : group.params()) {
      std::string how;
      auto it = block_of_.find(p.unsafeGetTensorImpl());
      if (it != block_of_.end()) {
        const KroneckerBlock& block = *blocks_[it->second];
        how = records_[it->second]->fired() || block.has_factors()
                  ? block.description()
                  : "plain gradient until its hooks fire (none so far: is the layer used "
                    "functionally?)";
      } else {
        how = "plain gradient: " + plain_reason(p);
      }
      rows.push_back({param_name(p), shape_text(p), how});
    }
  }
  size_t w0 = std::string("parameter").size(), w1 = std::string("shape").size();
  for (const auto& r : rows) {
    w0 = std::max(w0, r[0].size());
    w1 = std::max(w1, r[1].size());
  }
  std::ostringstream out;
  out << padded("parameter", w0) << "  " << padded("shape", w1) << "  preconditioner";
  for (const auto& r : rows)
    out << "\n" << padded(r[0], w0) << "  " << padded(r[1], w1) << "  " << r[2];
  return out.str();
}

void KFAC::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<KFACParamState, KFACOptions>(archive, *this);
  torch::serialize::OutputArchive kfac(archive.compilation_unit());
  kfac.write("steps", c10::IValue(steps_));
  kfac.write("faults", c10::IValue(to_dict(faults_)));
  kfac.write("ladder", c10::IValue(to_dict(ladder_)));
  c10::List<std::string> decomposed;
  for (const auto& name : decomposed_) decomposed.push_back(name);
  kfac.write("decomposed", c10::IValue(decomposed));
  kfac.write("num_blocks", c10::IValue(static_cast<int64_t>(blocks_.size())));
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const KroneckerBlock& block = *blocks_[i];
    torch::serialize::OutputArchive entry(archive.compilation_unit());
    entry.write("name", c10::IValue(block.name()));
    entry.write("kind", c10::IValue(std::string(kind_name(block.kind()))));
    c10::List<std::string> keys;
    for (const auto& [key, tensor] : block.state) {
      keys.push_back(key);
      entry.write("state_" + key, tensor, /*is_buffer=*/true);
    }
    entry.write("keys", c10::IValue(keys));
    kfac.write("block_" + std::to_string(i), entry);
  }
  archive.write("kfac", kfac);
}

void KFAC::load(torch::serialize::InputArchive& archive) {
  // Read and validate the curvature first: nothing changes unless all of it fits.
  torch::serialize::InputArchive kfac;
  TORCH_CHECK(archive.try_read("kfac", kfac),
              "natgrad::optim::KFAC::load: the archive has no 'kfac' entry (not saved by "
              "natgrad::optim::KFAC)");
  c10::IValue v;
  kfac.read("steps", v);
  const int64_t steps = v.toInt();
  kfac.read("faults", v);
  auto faults = from_dict(v, "faults");
  kfac.read("ladder", v);
  auto ladder = from_dict(v, "ladder");
  kfac.read("decomposed", v);
  std::set<std::string> decomposed;
  for (const auto& name : v.toListRef()) decomposed.insert(name.toStringRef());
  kfac.read("num_blocks", v);
  const int64_t count = v.toInt();
  std::map<std::string, KroneckerBlock*> mine;
  for (auto& block : blocks_) mine[block->name()] = block.get();
  std::map<KroneckerBlock*, std::map<std::string, torch::Tensor>> states;
  for (int64_t i = 0; i < count; ++i) {
    torch::serialize::InputArchive entry;
    kfac.read("block_" + std::to_string(i), entry);
    entry.read("name", v);
    const std::string name = v.toStringRef();
    auto it = mine.find(name);
    TORCH_CHECK(it != mine.end(),
                "natgrad::optim::KFAC::load: the archive has curvature for layer '", name,
                "', which this model lacks");
    KroneckerBlock& block = *it->second;
    entry.read("kind", v);
    TORCH_CHECK(v.toStringRef() == kind_name(block.kind()), "checkpoint block '", name, "' is '",
                v.toStringRef(), "', this layer is '", kind_name(block.kind()), "'");
    const auto expected = block.expected_shapes();
    entry.read("keys", v);
    auto& state = states[&block];
    for (const auto& key_value : v.toListRef()) {
      const std::string key = key_value.toStringRef();
      auto shape = expected.find(key);
      TORCH_CHECK(shape != expected.end(), "checkpoint block '", name, "' has an unknown entry '",
                  key, "'");
      torch::Tensor t;
      entry.read("state_" + key, t, /*is_buffer=*/true);
      TORCH_CHECK(t.sizes().vec() == shape->second, "checkpoint block '", name, "': ", key,
                  " has shape ", t.sizes(), ", this layer needs ", at::IntArrayRef(shape->second),
                  " (was the model's width changed?)");
      TORCH_CHECK(t.is_floating_point() && torch::isfinite(t).all().item<bool>(),
                  "checkpoint block '", name, "': ", key,
                  " must hold finite floating-point values");
      state[key] = t.to(block.weight().device());
    }
  }
  // torch's loader replaces state and options; momentum buffers must then fit their
  // parameters (it does not check shapes): on a mismatch the previous state comes back.
  ska::flat_hash_map<void*, std::unique_ptr<torch::optim::OptimizerParamState>> old_state;
  for (const auto& [key, value] : state()) old_state[key] = value->clone();
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> old_options;
  for (const auto& group : param_groups()) old_options.push_back(group.options().clone());
  try {
    torch::optim::serialize<KFACParamState, KFACOptions>(archive, *this);
    for (const auto& group : param_groups()) {
      for (const auto& p : group.params()) {
        auto it = state().find(p.unsafeGetTensorImpl());
        if (it == state().end()) continue;
        const auto& s = static_cast<const KFACParamState&>(*it->second);
        TORCH_CHECK(!s.momentum_buffer().defined() || s.momentum_buffer().sizes() == p.sizes(),
                    "natgrad::optim::KFAC::load: momentum_buffer of '", param_name(p),
                    "' has shape ", s.momentum_buffer().sizes(), ", the parameter has ", p.sizes(),
                    " (was the model's width changed?)");
      }
    }
  } catch (...) {
    state() = std::move(old_state);
    for (size_t i = 0; i < old_options.size() && i < param_groups().size(); ++i) {
      param_groups()[i].set_options(std::move(old_options[i]));
    }
    throw;
  }
  steps_ = steps;
  faults_ = std::move(faults);
  ladder_ = std::move(ladder);
  decomposed_ = std::move(decomposed);
  for (auto& block : blocks_) {
    auto it = states.find(block.get());
    block->state = it == states.end() ? std::map<std::string, torch::Tensor>{} : it->second;
  }
  clear_records();
}

}  // namespace natgrad::optim
