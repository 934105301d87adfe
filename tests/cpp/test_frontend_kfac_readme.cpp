// The C++ frontend page's example (docs/cpp.md includes the lines between the markers), as a test: it must
// compile against natgrad.h, train, describe, save and resume.
#include <torch/torch.h>

#include <cstdio>
#include <iostream>

#include "natgrad.h"
#include "test_helpers.h"

namespace {

TEST(ApiKfacReadme, ExampleTrainsDescribesSavesAndResumes) {
  const std::string path = ::testing::TempDir() + "natgrad_readme_kfac.pt";
  double first_loss = 0, last_loss = 0;
  // --8<-- [start:example]
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
    if (step == 0) first_loss = loss.item<double>();
    last_loss = loss.item<double>();
  }
  std::cout << opt.describe() << "\n";
  torch::save(opt, path);  // factors, decompositions, momentum, step counter
  natgrad::optim::KFAC resumed(model, options);
  torch::load(resumed, path);  // continues exactly like the uninterrupted run
  // --8<-- [end:example]
  std::remove(path.c_str());
  EXPECT_LT(last_loss, 0.8 * first_loss);
  EXPECT_EQ(resumed.steps(), 20);
  EXPECT_EQ(resumed.blocks().size(), 2u);
  EXPECT_NE(opt.describe().find("K-FAC linear (expand)"), std::string::npos);
}

}  // namespace
