// natgrad::nn capture layers (see layers.h).
#include "frontend/layers.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>

namespace natgrad::nn {

LayerRecords::LayerRecords(std::function<bool()> active, LayerRecordsOptions options)
    : active_(std::move(active)), options_(options) {}

bool LayerRecords::wants(bool training) const {
  if (options_.training_only && !training) return false;
  return at::GradMode::is_enabled() && (!active_ || active_());
}

void LayerRecords::track(const torch::Tensor& input, const torch::Tensor& output) {
  if (!output.defined() || !output.requires_grad()) return;
  auto call = std::make_shared<LayerCall>();
  call->input = input.detach();
  if (options_.keep_output) call->output = output;
  calls_.push_back(call);
  fired_ = true;
  if (!options_.hook_gradients) return;
  std::weak_ptr<LayerCall> weak = call;  // the records own the call; the graph only looks
  std::shared_ptr<bool> accepting = accepting_;
  // A const copy of `output` shares its autograd meta: the hook lands on the real output.
  torch::Tensor target = output;
  target.register_hook([weak, accepting](const torch::Tensor& grad) {
    auto record = weak.lock();
    if (record && !record->grad_output.defined() && *accepting) {
      record->grad_output = grad.detach();
      record->output = torch::Tensor();  // only needed before backward
    }
  });
}

std::vector<std::shared_ptr<LayerCall>> LayerRecords::complete() const {
  std::vector<std::shared_ptr<LayerCall>> out;
  for (const auto& call : calls_) {
    if (call->grad_output.defined()) out.push_back(call);
  }
  return out;
}

void CaptureLayer::attach(const std::shared_ptr<LayerRecords>& records) {
  TORCH_CHECK(records != nullptr, "CaptureLayer::attach: records must not be null");
  for (const auto& sink : sinks_) {
    if (sink.lock() == records) return;
  }
  sinks_.push_back(records);
}

void CaptureLayer::detach(const std::shared_ptr<LayerRecords>& records) {
  sinks_.erase(std::remove_if(sinks_.begin(), sinks_.end(),
                              [&](const std::weak_ptr<LayerRecords>& sink) {
                                auto live = sink.lock();
                                return !live || live == records;
                              }),
               sinks_.end());
}

size_t CaptureLayer::attached() const {
  return static_cast<size_t>(std::count_if(sinks_.begin(), sinks_.end(),
                                           [](const auto& sink) { return !sink.expired(); }));
}

void CaptureLayer::record(bool training, const torch::Tensor& input, const torch::Tensor& output) {
  bool expired = false;
  for (const auto& sink : sinks_) {
    auto records = sink.lock();
    if (!records) {
      expired = true;
      continue;
    }
    if (records->wants(training)) records->track(input, output);
  }
  if (expired) {
    sinks_.erase(std::remove_if(sinks_.begin(), sinks_.end(),
                                [](const auto& sink) { return sink.expired(); }),
                 sinks_.end());
  }
}

torch::Tensor LinearImpl::forward(const torch::Tensor& input) {
  torch::Tensor output = torch::nn::LinearImpl::forward(input);
  record(is_training(), input, output);
  return output;
}

torch::Tensor Conv2dImpl::forward(const torch::Tensor& input) {
  torch::Tensor output = torch::nn::Conv2dImpl::forward(input);
  record(is_training(), input, output);
  return output;
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& indices) {
  torch::Tensor output = torch::nn::EmbeddingImpl::forward(indices);
  record(is_training(), indices, output);
  return output;
}

namespace {

// Copies `from`'s parameters and buffers (values, requires_grad) and mode into `to`, a fresh
// module of the same type and options, optionally onto `device`.
std::shared_ptr<torch::nn::Module> copied(const torch::nn::Module& from,
                                          std::shared_ptr<torch::nn::Module> to,
                                          const std::optional<torch::Device>& device) {
  torch::NoGradGuard no_grad;
  auto params = to->named_parameters(/*recurse=*/false);
  for (const auto& item : from.named_parameters(/*recurse=*/false)) {
    torch::Tensor data = device ? item.value().to(*device).clone() : item.value().clone();
    params[item.key()].set_data(data);
    params[item.key()].set_requires_grad(item.value().requires_grad());
  }
  auto buffers = to->named_buffers(/*recurse=*/false);
  for (const auto& item : from.named_buffers(/*recurse=*/false)) {
    buffers[item.key()].set_data(device ? item.value().to(*device).clone() : item.value().clone());
  }
  to->train(from.is_training());
  return to;
}

}  // namespace

std::shared_ptr<torch::nn::Module> LinearImpl::clone(
    const std::optional<torch::Device>& device) const {
  return copied(*this, std::make_shared<LinearImpl>(options), device);
}

std::shared_ptr<torch::nn::Module> Conv2dImpl::clone(
    const std::optional<torch::Device>& device) const {
  torch::nn::Conv2dOptions o(options.in_channels(), options.out_channels(), options.kernel_size());
  o.stride(options.stride())
      .padding(options.padding())
      .dilation(options.dilation())
      .groups(options.groups())
      .bias(options.bias())
      .padding_mode(options.padding_mode());
  return copied(*this, std::make_shared<Conv2dImpl>(o), device);
}

std::shared_ptr<torch::nn::Module> EmbeddingImpl::clone(
    const std::optional<torch::Device>& device) const {
  torch::nn::EmbeddingOptions o = options;
  o._weight(torch::Tensor());  // never share a pretrained weight with the copy
  return copied(*this, std::make_shared<EmbeddingImpl>(o), device);
}

CaptureLayer* as_capture_layer(torch::nn::Module& module) {
  return dynamic_cast<CaptureLayer*>(&module);
}

}  // namespace natgrad::nn
