// Capture layers of natgrad's C++ frontend: drop-in replacements for torch::nn::Linear, Conv2d
// and Embedding that can record what K-FAC (natgrad::optim::KFAC) and EWC need.
//
// The C++ frontend has no module forward hooks, so the layers record themselves: each is a
// subclass of torch's module (same options struct, same parameters, same state-dict keys, same
// forward) whose forward additionally hands its input and output to every attached, active
// LayerRecords. A LayerRecords keeps one LayerCall per forward call (the detached input, and,
// once a backward pass reaches the output, the gradient with respect to it, through a tensor
// hook), exactly as python/natgrad/curvature/capture.py's LayerCapture does with module hooks.
// Nothing is recorded under torch::NoGradGuard, for an output that does not require grad, in
// eval mode (unless training_only is false), or while the owner's `active` predicate is false.
//
// A layer holds only weak references to its records: an optimizer that is destroyed stops
// capturing without detaching explicitly; several owners (a KFAC and an EWC) may attach at once.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace natgrad::nn {

/// One forward call of a capture layer: its input and, once a backward pass reached the
/// output, `grad_output` (undefined until then). `output` is kept only when the records were
/// made with `keep_output` (for owners that differentiate their own losses with respect to it).
struct LayerCall {
  torch::Tensor input;        ///< the layer's input, detached (indices for an Embedding)
  torch::Tensor output;       ///< the layer's output (only with keep_output; else undefined)
  torch::Tensor grad_output;  ///< gradient of the loss with respect to the output
};

/// What a LayerRecords records.
struct LayerRecordsOptions {
  bool training_only = true;   ///< ignore forward calls of a layer in eval mode
  bool keep_output = false;    ///< keep LayerCall::output (released once its gradient arrives)
  bool hook_gradients = true;  ///< register a hook that fills LayerCall::grad_output
};

/// The records one owner (an optimizer, an EWC consolidation) collects from one layer.
///
/// `active` decides, at each forward call, whether this call is recorded (e.g. "this step
/// updates the factors"); an empty function means always. Thread-compatible like a module.
class LayerRecords {
 public:
  explicit LayerRecords(std::function<bool()> active = {}, LayerRecordsOptions options = {});

  /// Whether a forward call in the given training mode is recorded now.
  bool wants(bool training) const;
  /// Records one forward call (the layer calls this; no-op unless `output` requires grad).
  void track(const torch::Tensor& input, const torch::Tensor& output);
  /// Every recorded call, in call order.
  const std::vector<std::shared_ptr<LayerCall>>& calls() const { return calls_; }
  /// The calls whose output gradient has arrived (a forward without backward is ignored).
  std::vector<std::shared_ptr<LayerCall>> complete() const;
  /// Drops every record (an owner does so once per step).
  void clear() { calls_.clear(); }
  /// Whether any forward call was ever recorded (for KFAC::describe()).
  bool fired() const { return fired_; }
  /// Sets whether gradients arriving now are accepted (e.g. only a sampled-label pass).
  void set_accepting(bool accepting) { *accepting_ = accepting; }

 private:
  std::function<bool()> active_;
  LayerRecordsOptions options_;
  std::vector<std::shared_ptr<LayerCall>> calls_;
  bool fired_ = false;
  std::shared_ptr<bool> accepting_ = std::make_shared<bool>(true);  // shared with the hooks
};

/// The capture side shared by natgrad::nn::Linear, Conv2d and Embedding (a mixin next to the
/// torch module base): owners attach LayerRecords and find the layers by dynamic_cast.
class CaptureLayer {
 public:
  virtual ~CaptureLayer() = default;
  /// Starts recording into `records` (kept by weak reference; attaching twice is a no-op).
  void attach(const std::shared_ptr<LayerRecords>& records);
  /// Stops recording into `records` (no-op if not attached).
  void detach(const std::shared_ptr<LayerRecords>& records);
  /// Number of live attached records.
  size_t attached() const;
  /// "linear", "conv2d" or "embedding".
  virtual std::string capture_kind() const = 0;

 protected:
  /// Hands one forward call to every attached, interested LayerRecords.
  void record(bool training, const torch::Tensor& input, const torch::Tensor& output);

 private:
  std::vector<std::weak_ptr<LayerRecords>> sinks_;
};

/// torch::nn::Linear that records for natgrad (see the file comment).
class LinearImpl : public torch::nn::LinearImpl, public CaptureLayer {
 public:
  LinearImpl(int64_t in_features, int64_t out_features)
      : LinearImpl(torch::nn::LinearOptions(in_features, out_features)) {}
  explicit LinearImpl(const torch::nn::LinearOptions& options) : torch::nn::LinearImpl(options) {}
  /// torch::nn::Linear's forward, recorded while an owner is collecting.
  torch::Tensor forward(const torch::Tensor& input);
  std::string capture_kind() const override { return "linear"; }
  /// A deep copy that is a natgrad::nn::Linear too (no records attached).
  std::shared_ptr<torch::nn::Module> clone(
      const std::optional<torch::Device>& device = std::nullopt) const override;
};

/// torch::nn::Conv2d that records for natgrad (see the file comment).
class Conv2dImpl : public torch::nn::Conv2dImpl, public CaptureLayer {
 public:
  Conv2dImpl(int64_t input_channels, int64_t output_channels, torch::ExpandingArray<2> kernel_size)
      : Conv2dImpl(torch::nn::Conv2dOptions(input_channels, output_channels, kernel_size)) {}
  explicit Conv2dImpl(const torch::nn::Conv2dOptions& options) : torch::nn::Conv2dImpl(options) {}
  /// torch::nn::Conv2d's forward, recorded while an owner is collecting.
  torch::Tensor forward(const torch::Tensor& input);
  std::string capture_kind() const override { return "conv2d"; }
  /// A deep copy that is a natgrad::nn::Conv2d too (no records attached).
  std::shared_ptr<torch::nn::Module> clone(
      const std::optional<torch::Device>& device = std::nullopt) const override;
};

/// torch::nn::Embedding that records for natgrad (see the file comment).
class EmbeddingImpl : public torch::nn::EmbeddingImpl, public CaptureLayer {
 public:
  EmbeddingImpl(int64_t num_embeddings, int64_t embedding_dim)
      : EmbeddingImpl(torch::nn::EmbeddingOptions(num_embeddings, embedding_dim)) {}
  explicit EmbeddingImpl(const torch::nn::EmbeddingOptions& options)
      : torch::nn::EmbeddingImpl(options) {}
  /// torch::nn::Embedding's forward, recorded while an owner is collecting.
  torch::Tensor forward(const torch::Tensor& indices);
  std::string capture_kind() const override { return "embedding"; }
  /// A deep copy that is a natgrad::nn::Embedding too (no records attached).
  std::shared_ptr<torch::nn::Module> clone(
      const std::optional<torch::Device>& device = std::nullopt) const override;
};

TORCH_MODULE(Linear);
TORCH_MODULE(Conv2d);
TORCH_MODULE(Embedding);

/// The capture layer behind `module`, or nullptr when it is not a natgrad::nn layer.
CaptureLayer* as_capture_layer(torch::nn::Module& module);

}  // namespace natgrad::nn
