// The C++ frontend page's example (docs/cpp.md includes the lines between the markers), as a
// test: it must compile against natgrad.h, train, describe, save and resume.
#include <torch/torch.h>

#include <cstdio>
#include <iostream>

#include "natgrad.h"
#include "test_helpers.h"

namespace {

// --8<-- [start:example]
// Trains a small MLP with natgrad's K-FAC, prints which block each parameter got, saves the
// optimizer to `path` and resumes from it; returns the trained model.
torch::nn::Sequential train_describe_save_resume(const std::string& path) {
  torch::manual_seed(0);
  // natgrad::nn layers are torch's Linear / Conv2d / Embedding (same options, parameters and
  // state-dict keys) that record what K-FAC needs; any other module takes the plain gradient.
  torch::nn::Sequential model(natgrad::nn::Linear(64, 32), torch::nn::Tanh(),
                              natgrad::nn::Linear(32, 10));
  natgrad::optim::KFACOptions options(/*lr=*/0.1);
  options.momentum(0.9)
      .damping(1e-3)
      .factor_update_period(1)
      .inverse_update_period(10)
      .kl_clip(1e-3)
      .inverse_method("eigen");
  natgrad::optim::KFAC opt(model, options);

  torch::Tensor x = torch::randn({128, 64}), y = torch::randint(0, 10, {128});
  for (int step = 0; step < 20; ++step) {
    opt.zero_grad();
    torch::Tensor loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    loss.backward();
    opt.step();
  }
  std::cout << opt.describe() << "\n";
  torch::save(opt, path);  // factors, decompositions, momentum, step counter
  natgrad::optim::KFAC resumed(model, options);
  torch::load(resumed, path);  // continues exactly like the uninterrupted run
  return model;
}
// --8<-- [end:example]

TEST(ApiKfacReadme, ExampleTrainsDescribesSavesAndResumes) {
  const std::string path = ::testing::TempDir() + "natgrad_readme_kfac.pt";
  torch::nn::Sequential trained = train_describe_save_resume(path);

  // The same seed gives the example's initial weights and data: training lowered the loss.
  torch::manual_seed(0);
  torch::nn::Sequential fresh(natgrad::nn::Linear(64, 32), torch::nn::Tanh(), natgrad::nn::Linear(32, 10));
  torch::Tensor x = torch::randn({128, 64}), y = torch::randint(0, 10, {128});
  torch::NoGradGuard no_grad;
  const double first_loss = torch::nn::functional::cross_entropy(fresh->forward(x), y).item<double>();
  const double last_loss = torch::nn::functional::cross_entropy(trained->forward(x), y).item<double>();
  EXPECT_LT(last_loss, 0.8 * first_loss);

  natgrad::optim::KFAC reloaded(trained, natgrad::optim::KFACOptions(0.1));
  torch::load(reloaded, path);
  std::remove(path.c_str());
  EXPECT_EQ(reloaded.steps(), 20);
  EXPECT_EQ(reloaded.blocks().size(), 2u);
  EXPECT_NE(reloaded.describe().find("K-FAC linear (expand)"), std::string::npos);
}

}  // namespace
