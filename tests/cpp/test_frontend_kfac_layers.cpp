// natgrad::nn capture layers: torch's modules plus recording (csrc/frontend/layers.h).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "natgrad.h"
#include "test_helpers.h"

namespace {

using natgrad::nn::LayerRecords;
using natgrad_test::AllClose;

std::vector<std::string> keys(const torch::nn::Module& m) {
  std::vector<std::string> out;
  for (const auto& item : m.named_parameters()) out.push_back(item.key());
  for (const auto& item : m.named_buffers()) out.push_back(item.key());
  return out;
}

TEST(ApiLayers, SameParametersStateKeysAndForwardAsTorchModules) {
  torch::manual_seed(0);
  natgrad::nn::Linear fc(torch::nn::LinearOptions(5, 3));
  torch::nn::Linear ref(torch::nn::LinearOptions(5, 3));
  EXPECT_EQ(keys(*fc), keys(*ref));
  {
    torch::NoGradGuard guard;
    ref->weight.copy_(fc->weight);
    ref->bias.copy_(fc->bias);
  }
  auto x = torch::randn({4, 5});
  EXPECT_TRUE(torch::equal(fc(x), ref(x)));

  natgrad::nn::Conv2d conv(torch::nn::Conv2dOptions(2, 3, 3).padding(1).bias(false));
  torch::nn::Conv2d conv_ref(torch::nn::Conv2dOptions(2, 3, 3).padding(1).bias(false));
  EXPECT_EQ(keys(*conv), keys(*conv_ref));
  {
    torch::NoGradGuard guard;
    conv_ref->weight.copy_(conv->weight);
  }
  auto img = torch::randn({2, 2, 5, 5});
  EXPECT_TRUE(torch::equal(conv(img), conv_ref(img)));

  natgrad::nn::Embedding emb(7, 4);
  torch::nn::Embedding emb_ref(7, 4);
  EXPECT_EQ(keys(*emb), keys(*emb_ref));
  {
    torch::NoGradGuard guard;
    emb_ref->weight.copy_(emb->weight);
  }
  auto idx = torch::tensor({1, 6, 0}, torch::kLong);
  EXPECT_TRUE(torch::equal(emb(idx), emb_ref(idx)));
}

TEST(ApiLayers, RecordsInputAndOutputGradientOfEveryCall) {
  torch::manual_seed(1);
  natgrad::nn::Linear fc(4, 2);
  auto records = std::make_shared<LayerRecords>();
  fc->attach(records);
  auto x1 = torch::randn({3, 4}, torch::kDouble);
  auto x2 = torch::randn({5, 4}, torch::kDouble);
  fc->to(torch::kDouble);
  auto y1 = fc(x1), y2 = fc(x2);  // a layer used twice: two records
  auto loss = y1.pow(2).sum() + (y2 * 3).sum();
  auto grads = torch::autograd::grad({loss}, {y1, y2}, {}, /*retain_graph=*/true);
  ASSERT_EQ(records->calls().size(), 2u);
  auto done = records->complete();
  ASSERT_EQ(done.size(), 2u);
  EXPECT_TRUE(torch::equal(done[0]->input, x1));
  EXPECT_TRUE(torch::equal(done[1]->input, x2));
  EXPECT_TRUE(AllClose(done[0]->grad_output, grads[0], 0.0));
  EXPECT_TRUE(AllClose(done[1]->grad_output, grads[1], 0.0));
  EXPECT_FALSE(done[0]->input.requires_grad());
  // A second backward pass does not overwrite the first gradient.
  loss.backward();
  EXPECT_TRUE(AllClose(records->complete()[0]->grad_output, grads[0], 0.0));
  EXPECT_TRUE(records->fired());
  records->clear();
  EXPECT_TRUE(records->calls().empty());
}

TEST(ApiLayers, RecordsNothingWhenInactiveWithoutGradInEvalOrDetached) {
  natgrad::nn::Conv2d conv(torch::nn::Conv2dOptions(1, 2, 3));
  bool active = false;
  auto records = std::make_shared<LayerRecords>([&] { return active; });
  conv->attach(records);
  conv->attach(records);  // attaching twice records once
  EXPECT_EQ(conv->attached(), 1u);
  auto x = torch::randn({2, 1, 6, 6});
  conv(x).sum().backward();
  EXPECT_TRUE(records->calls().empty());  // inactive
  active = true;
  {
    torch::NoGradGuard guard;
    conv(x);
  }
  EXPECT_TRUE(records->calls().empty());  // no grad mode
  conv->eval();
  conv(x).sum().backward();
  EXPECT_TRUE(records->calls().empty());  // eval mode (training_only)
  conv->train();
  conv(x).sum().backward();
  EXPECT_EQ(records->complete().size(), 1u);
  conv->detach(records);
  conv(x).sum().backward();
  EXPECT_EQ(records->calls().size(), 1u);  // detached
  EXPECT_EQ(conv->attached(), 0u);
  // An owner that is gone stops the capture without detaching.
  auto gone = std::make_shared<LayerRecords>();
  conv->attach(gone);
  EXPECT_EQ(conv->attached(), 1u);
  std::weak_ptr<LayerRecords> weak = gone;
  gone.reset();
  EXPECT_TRUE(weak.expired());
  conv(x).sum().backward();
  EXPECT_EQ(conv->attached(), 0u);
}

TEST(ApiLayers, RecordsInsideSequentialAndFindsLayersByCast) {
  torch::nn::Sequential net(natgrad::nn::Linear(3, 4), torch::nn::Tanh(), torch::nn::Linear(4, 2),
                            natgrad::nn::Embedding(5, 2));
  int layers = 0;
  std::shared_ptr<LayerRecords> records = std::make_shared<LayerRecords>();
  for (const auto& m : net->modules(/*include_self=*/false)) {
    if (auto* layer = natgrad::nn::as_capture_layer(*m)) {
      ++layers;
      if (layer->capture_kind() == "linear") layer->attach(records);
    }
  }
  EXPECT_EQ(layers, 2);
  auto* first = net->ptr(0).get();
  auto out = net[2]->as<torch::nn::Linear>()->forward(
      torch::tanh(first->as<natgrad::nn::Linear>()->forward(torch::randn({2, 3}))));
  out.sum().backward();
  ASSERT_EQ(records->complete().size(), 1u);
  EXPECT_EQ(records->complete()[0]->grad_output.sizes(), (std::vector<int64_t>{2, 4}));
}

TEST(ApiLayers, EmbeddingRecordsIndicesAndKeepsOutputOnRequest) {
  natgrad::nn::Embedding emb(6, 3);
  natgrad::nn::LayerRecordsOptions opts;
  opts.keep_output = true;
  opts.hook_gradients = false;
  auto records = std::make_shared<LayerRecords>(std::function<bool()>{}, opts);
  emb->attach(records);
  auto idx = torch::tensor({{1, 2}, {5, 5}}, torch::kLong);
  auto out = emb(idx);
  ASSERT_EQ(records->calls().size(), 1u);
  EXPECT_TRUE(torch::equal(records->calls()[0]->input, idx));
  EXPECT_TRUE(records->calls()[0]->output.is_same(out));
  out.sum().backward();
  EXPECT_TRUE(records->complete().empty());  // no gradient hook requested
}

TEST(ApiLayers, CloneKeepsTheNatgradTypeValuesAndOptionsButNoRecords) {
  natgrad::nn::Conv2d conv(torch::nn::Conv2dOptions(2, 4, 3).stride(2).padding(1).bias(false));
  conv->attach(std::make_shared<LayerRecords>());
  conv->eval();
  auto copy = std::dynamic_pointer_cast<natgrad::nn::Conv2dImpl>(conv->clone());
  ASSERT_NE(copy, nullptr);
  EXPECT_TRUE(torch::equal(copy->weight, conv->weight));
  EXPECT_FALSE(copy->weight.is_same(conv->weight));
  EXPECT_FALSE(copy->bias.defined());
  EXPECT_FALSE(copy->is_training());
  EXPECT_EQ(copy->attached(), 0u);
  auto x = torch::randn({1, 2, 5, 5});
  EXPECT_TRUE(torch::equal(copy->forward(x), conv(x)));

  torch::nn::Sequential net(natgrad::nn::Linear(3, 2), natgrad::nn::Embedding(4, 2));
  auto net_copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(net->clone());
  ASSERT_NE(net_copy, nullptr);
  EXPECT_NE(natgrad::nn::as_capture_layer(*net_copy->ptr(0)), nullptr);
  EXPECT_NE(natgrad::nn::as_capture_layer(*net_copy->ptr(1)), nullptr);
  EXPECT_TRUE(torch::equal(net_copy->ptr(1)->named_parameters()["weight"],
                           net[1]->named_parameters()["weight"]));
}

}  // namespace
