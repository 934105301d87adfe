// natgrad::EWC checkpoints: options and every task through torch::serialize archives
// (see frontend/ewc.h).
#include <torch/serialize/archive.h>

#include <string>
#include <utility>
#include <vector>

#include "frontend/ewc.h"

namespace natgrad {
namespace {

constexpr int64_t kFormatVersion = 1;

bool all_finite(const at::Tensor& t) {
  return t.numel() == 0 || at::isfinite(t).all().item<bool>();
}

}  // namespace

void EWC::save(torch::serialize::OutputArchive& archive) const {
  archive.write("format_version", c10::IValue(kFormatVersion));
  archive.write("lambda", c10::IValue(options_.lambda()));
  archive.write("mode", c10::IValue(options_.mode()));
  archive.write("gamma", c10::IValue(options_.gamma()));
  archive.write("fisher_type", c10::IValue(options_.fisher_type()));
  archive.write("likelihood", c10::IValue(options_.likelihood()));
  archive.write("train_mode", c10::IValue(options_.train_mode()));
  archive.write("mc_samples", c10::IValue(options_.mc_samples()));
  archive.write("num_tasks", c10::IValue(static_cast<int64_t>(tasks_.size())));
  for (size_t t = 0; t < tasks_.size(); ++t) {
    torch::serialize::OutputArchive sub(archive.compilation_unit());
    c10::List<std::string> names;
    for (const auto& n : tasks_[t].names) names.push_back(n);
    sub.write("names", c10::IValue(names));
    for (size_t j = 0; j < tasks_[t].names.size(); ++j) {
      sub.write("fisher_" + std::to_string(j), tasks_[t].fisher[j], /*is_buffer=*/true);
      sub.write("anchor_" + std::to_string(j), tasks_[t].anchor[j], /*is_buffer=*/true);
    }
    archive.write("task_" + std::to_string(t), sub);
  }
}

void EWC::load(torch::serialize::InputArchive& archive) {
  c10::IValue v;
  TORCH_CHECK(archive.try_read("format_version", v) && v.isInt() && v.toInt() == kFormatVersion,
              "EWC.load: not a natgrad::EWC archive (format_version ", kFormatVersion,
              " expected)");
  EWCOptions o;
  archive.read("lambda", v);
  o.lambda(v.toDouble());
  archive.read("mode", v);
  o.mode(v.toStringRef());
  archive.read("gamma", v);
  o.gamma(v.toDouble());
  archive.read("fisher_type", v);
  o.fisher_type(v.toStringRef());
  archive.read("likelihood", v);
  o.likelihood(v.toStringRef());
  archive.read("train_mode", v);
  o.train_mode(v.toBool());
  archive.read("mc_samples", v);
  o.mc_samples(v.toInt());
  validate(o);
  archive.read("num_tasks", v);
  const int64_t count = v.toInt();
  TORCH_CHECK(count >= 0, "EWC.load: num_tasks must be >= 0, got ", count);
  std::vector<Task> tasks(count);
  for (int64_t t = 0; t < count; ++t) {
    torch::serialize::InputArchive sub;
    archive.read("task_" + std::to_string(t), sub);
    sub.read("names", v);
    for (const auto& n : v.toListRef()) tasks[t].names.push_back(n.toStringRef());
    for (size_t j = 0; j < tasks[t].names.size(); ++j) {
      at::Tensor f, a;
      sub.read("fisher_" + std::to_string(j), f, /*is_buffer=*/true);
      sub.read("anchor_" + std::to_string(j), a, /*is_buffer=*/true);
      for (const auto& [tensor, part] : {std::pair{f, "fisher"}, std::pair{a, "anchor"}}) {
        TORCH_CHECK(tensor.defined() && tensor.is_floating_point() && all_finite(tensor),
                    "EWC.load: task ", t, " ", part, " of '", tasks[t].names[j],
                    "' must be a finite floating-point tensor (NaN/Inf or not a tensor)");
      }
      TORCH_CHECK(f.sizes() == a.sizes(), "EWC.load: task ", t, " fisher of '", tasks[t].names[j],
                  "' has shape ", f.sizes(), " but its anchor ", a.sizes());
      tasks[t].fisher.push_back(f);
      tasks[t].anchor.push_back(a);
    }
  }
  options_ = std::move(o);
  tasks_ = std::move(tasks);
  ++revision_;
}

torch::serialize::OutputArchive& operator<<(torch::serialize::OutputArchive& archive,
                                            const EWC& ewc) {
  ewc.save(archive);
  return archive;
}

torch::serialize::InputArchive& operator>>(torch::serialize::InputArchive& archive, EWC& ewc) {
  ewc.load(archive);
  return archive;
}

}  // namespace natgrad
