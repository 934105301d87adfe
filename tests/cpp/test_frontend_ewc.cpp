// natgrad::EWC (csrc/frontend/ewc.h) against the Python natgrad.EWC: the reference values in
// tests/cpp/data/ewc_parity.pt are written by tests/fixtures/make_ewc_parity.py (float64), and
// tests/python/regularizers/test_ewc_fixture.py checks that the committed file still matches Python.
#include <torch/serialize.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "natgrad.h"  // natgrad::EWC and the capture layers, as users include them
#include "test_fixtures.h"
#include "test_helpers.h"

namespace {

using natgrad_test::AllClose;
using natgrad_test::ThrowsMentioning;

// The fixture, under $NATGRAD_SOURCE_ROOT (set by ctest).
std::string fixture_path() { return natgrad_test::source_path("tests/cpp/data/ewc_parity.pt"); }

class Fixture {
 public:
  Fixture() {
    std::ifstream in(fixture_path(), std::ios::binary);
    if (!in) throw std::runtime_error("cannot open " + fixture_path());
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (const auto& item : torch::pickle_load(bytes).toGenericDict()) {
      values_[item.key().toStringRef()] = item.value().toTensor();
    }
  }
  const at::Tensor& operator[](const std::string& key) const {
    auto it = values_.find(key);
    if (it == values_.end()) throw std::runtime_error("fixture has no key " + key);
    return it->second;
  }

 private:
  std::map<std::string, at::Tensor> values_;
};

const Fixture& fixture() {
  static const Fixture f;
  return f;
}

// The fixture's model: Linear(6,5) → Tanh → LayerNorm(5) → Linear(5,3), float64, θ₁.
// With capture = true its Linear layers are natgrad::nn::Linear (the linear_diag_fisher path);
// otherwise torch::nn::Linear (per-sample autograd for every parameter).
torch::nn::Sequential make_model(bool capture = false) {
  torch::nn::Sequential net;
  if (capture)
    net->push_back(natgrad::nn::Linear(6, 5));
  else
    net->push_back(torch::nn::Linear(6, 5));
  net->push_back(torch::nn::Tanh());
  net->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({5})));
  if (capture)
    net->push_back(natgrad::nn::Linear(5, 3));
  else
    net->push_back(torch::nn::Linear(5, 3));
  net->to(at::kDouble);
  return net;
}

// Both paths give the Python values; the tests below run on each.
class ApiEwcPaths : public ::testing::TestWithParam<bool> {};
INSTANTIATE_TEST_SUITE_P(LinearLayers, ApiEwcPaths, ::testing::Values(false, true),
                         [](const auto& info) {
                           return info.param ? "NatgradLinear" : "TorchLinear";
                         });

void set_params(torch::nn::Module& net, const std::string& prefix) {
  torch::NoGradGuard no_grad;
  for (auto& item : net.named_parameters()) item.value().copy_(fixture()[prefix + item.key()]);
}

// Consolidates task 1 at θ₁ (one batch) and task 2 at θ₂ (batches of 5 and 7), then moves to θ₃:
// the sequence of tests/fixtures/make_ewc_parity.py.
void run_two_tasks(torch::nn::Module& net, natgrad::EWC& ewc) {
  const Fixture& f = fixture();
  set_params(net, "init/");
  ewc.consolidate(f["x1"], f["y1"]);
  set_params(net, "theta2/");
  ewc.consolidate({{f["x2"].narrow(0, 0, 5), f["y2"].narrow(0, 0, 5)},
                   {f["x2"].narrow(0, 5, 7), f["y2"].narrow(0, 5, 7)}});
  set_params(net, "theta3/");
}

void expect_matches_python(const std::string& case_name, torch::nn::Module& net,
                           const natgrad::EWC& ewc, size_t tasks) {
  ASSERT_EQ(ewc.tasks().size(), tasks);
  for (size_t t = 0; t < tasks; ++t) {
    for (const auto& item : net.named_parameters()) {
      EXPECT_TRUE(AllClose(ewc.fisher(item.key(), t),
                           fixture()[case_name + "/fisher" + std::to_string(t) + "/" + item.key()],
                           1e-10))
          << case_name << " task " << t << " " << item.key();
    }
  }
  net.zero_grad();
  const at::Tensor penalty = ewc.penalty();
  EXPECT_TRUE(AllClose(penalty, fixture()[case_name + "/penalty"], 1e-10));
  penalty.backward();
  for (const auto& item : net.named_parameters()) {
    EXPECT_TRUE(AllClose(item.value().grad(), fixture()[case_name + "/grad/" + item.key()], 1e-10))
        << case_name << " grad " << item.key();
  }
}

TEST_P(ApiEwcPaths, SeparateModeFisherPenaltyAndGradientMatchPython) {
  auto net = make_model(GetParam());
  natgrad::EWC ewc(net, natgrad::EWCOptions(3.0).mode("separate"));
  EXPECT_TRUE(AllClose(ewc.penalty(), at::zeros({}, at::kDouble), 0.0));  // nothing consolidated
  run_two_tasks(*net, ewc);
  expect_matches_python("separate", *net, ewc, 2);
}

TEST_P(ApiEwcPaths, OnlineModeDecaysTheFisherAndKeepsTheLatestAnchor) {
  auto net = make_model(GetParam());
  natgrad::EWC ewc(net, natgrad::EWCOptions(3.0).mode("online").gamma(0.7));
  run_two_tasks(*net, ewc);
  expect_matches_python("online", *net, ewc, 1);
  // θ* is the latest parameters (θ₂), not θ₁.
  for (size_t j = 0; j < ewc.tasks()[0].names.size(); ++j) {
    EXPECT_TRUE(
        AllClose(ewc.tasks()[0].anchor[j], fixture()["theta2/" + ewc.tasks()[0].names[j]], 0.0));
  }
}

TEST_P(ApiEwcPaths, ExactCategoricalAndGaussianFishersMatchPython) {
  const Fixture& f = fixture();
  for (const std::string which : {"exact", "gaussian"}) {
    auto net = make_model(GetParam());
    set_params(*net, "init/");
    natgrad::EWCOptions o(1.0);
    if (which == "exact")
      o.fisher_type("exact");
    else
      o.likelihood("gaussian");
    natgrad::EWC ewc(net, o);
    ewc.consolidate(f["x1"], which == "exact" ? at::Tensor() : f["yg"]);
    for (const auto& item : net->named_parameters()) {
      EXPECT_TRUE(AllClose(ewc.fisher(item.key()), f[which + "/fisher0/" + item.key()], 1e-10))
          << which << " " << item.key();
    }
  }
}

TEST_P(ApiEwcPaths, MonteCarloFisherIsTheEmpiricalOneAtSampledLabels) {
  // One draw per sample: the mc Fisher is the empirical Fisher at labels drawn from the model's
  // predictive distribution with the same generator (Python's draw: softmax in float32, then
  // multinomial over the batch's rows).
  const Fixture& f = fixture();
  auto net = make_model(GetParam());
  set_params(*net, "init/");
  natgrad::EWC mc(net, natgrad::EWCOptions(1.0).fisher_type("mc"));
  mc.consolidate(f["x1"], at::Tensor(), at::make_generator<at::CPUGeneratorImpl>(7));
  at::Tensor labels;
  {
    torch::NoGradGuard no_grad;
    const at::Tensor probs = at::softmax(net->forward(f["x1"]).to(at::kFloat), -1);
    labels =
        at::multinomial(probs, 1, false, at::make_generator<at::CPUGeneratorImpl>(7)).reshape({-1});
  }
  natgrad::EWC empirical(net, natgrad::EWCOptions(1.0));
  empirical.consolidate(f["x1"], labels);
  for (const auto& item : net->named_parameters()) {
    EXPECT_TRUE(AllClose(mc.fisher(item.key()), empirical.fisher(item.key()), 1e-12)) << item.key();
  }
  // Many draws (weight 1/sqrt(draws) each) approach the exact expectation.
  natgrad::EWC many(net, natgrad::EWCOptions(1.0).fisher_type("mc").mc_samples(150));
  many.consolidate(f["x1"], at::Tensor(), at::make_generator<at::CPUGeneratorImpl>(8));
  natgrad::EWC exact(net, natgrad::EWCOptions(1.0).fisher_type("exact"));
  exact.consolidate(f["x1"], at::Tensor());
  for (const auto& name : {"0.weight", "3.weight", "3.bias"}) {
    const at::Tensor e = exact.fisher(name), m = many.fisher(name);
    EXPECT_LT(((m - e).norm() / e.norm()).item<double>(), 0.15) << name;
  }
}

TEST(ApiEwc, SaveLoadRoundTripRestoresTasksAndOptions) {
  auto net = make_model();
  natgrad::EWC ewc(net, natgrad::EWCOptions(3.0).mode("separate"));
  run_two_tasks(*net, ewc);
  const std::string path =
      (std::filesystem::temp_directory_path() / "natgrad_ewc_roundtrip.pt").string();
  torch::save(ewc, path);
  natgrad::EWC restored(net, natgrad::EWCOptions(0.5).mode("online").gamma(0.2));
  torch::load(restored, path);
  std::remove(path.c_str());
  EXPECT_EQ(restored.options().lambda(), 3.0);
  EXPECT_EQ(restored.options().mode(), "separate");
  EXPECT_EQ(restored.options().gamma(), 1.0);
  ASSERT_EQ(restored.tasks().size(), 2u);
  for (size_t t = 0; t < 2; ++t) {
    EXPECT_EQ(restored.tasks()[t].names, ewc.tasks()[t].names);
    for (size_t j = 0; j < ewc.tasks()[t].names.size(); ++j) {
      EXPECT_TRUE(AllClose(restored.tasks()[t].fisher[j], ewc.tasks()[t].fisher[j], 0.0));
      EXPECT_TRUE(AllClose(restored.tasks()[t].anchor[j], ewc.tasks()[t].anchor[j], 0.0));
    }
  }
  EXPECT_TRUE(AllClose(restored.penalty(), ewc.penalty(), 0.0));
  expect_matches_python("separate", *net, restored, 2);
}

TEST(ApiEwc, EstimatorNamesThePathOfEachParameter) {
  auto net = make_model(/*capture=*/true);
  natgrad::EWC ewc(net, natgrad::EWCOptions(1.0));
  ewc.consolidate(fixture()["x1"], fixture()["y1"]);
  EXPECT_EQ(ewc.estimator().at("0.weight"), "linear_diag_fisher");
  EXPECT_EQ(ewc.estimator().at("3.bias"), "linear_diag_fisher");
  EXPECT_EQ(ewc.estimator().at("2.weight"), "per-sample autograd");  // the LayerNorm
  auto plain = make_model(/*capture=*/false);
  natgrad::EWC other(plain, natgrad::EWCOptions(1.0));
  other.consolidate(fixture()["x1"], fixture()["y1"]);
  EXPECT_EQ(other.estimator().at("0.weight"), "per-sample autograd");
}

TEST(ApiEwc, ALayerCalledTwicePerForwardTakesThePerSamplePath) {
  // fc(tanh(fc(x))): the layer's rows are no longer one per sample, so linear_diag_fisher does not
  // apply; the per-sample autograd path gives the same Fisher as for a torch::nn::Linear.
  const at::Tensor x = fixture()["x1"].narrow(1, 0, 4).contiguous();
  const at::Tensor y = fixture()["y1"].remainder(4);
  natgrad::nn::Linear captured(4, 4);
  torch::nn::Linear plain(4, 4);
  captured->to(at::kDouble);
  plain->to(at::kDouble);
  {
    torch::NoGradGuard no_grad;
    plain->weight.copy_(captured->weight);
    plain->bias.copy_(captured->bias);
  }
  natgrad::EWC a(
      captured.ptr(), [&](const at::Tensor& in) { return captured(at::tanh(captured(in))); },
      natgrad::EWCOptions(1.0));
  natgrad::EWC b(
      plain.ptr(), [&](const at::Tensor& in) { return plain(at::tanh(plain(in))); },
      natgrad::EWCOptions(1.0));
  a.consolidate(x, y);
  b.consolidate(x, y);
  EXPECT_EQ(a.estimator().at("weight"), "per-sample autograd");
  EXPECT_TRUE(AllClose(a.fisher("weight"), b.fisher("weight"), 1e-12));
  EXPECT_TRUE(AllClose(a.fisher("bias"), b.fisher("bias"), 1e-12));
  EXPECT_EQ(captured->attached(), 0u);  // the consolidation's records are gone
}

// The C++ frontend page's EWC example (docs/cpp.md includes the lines between the markers).
TEST(ApiEwc, ReadmeExampleRuns) {
  torch::manual_seed(0);
  torch::nn::Sequential model(natgrad::nn::Linear(784, 64), torch::nn::ReLU(),
                              natgrad::nn::Linear(64, 10));
  auto x_a = torch::rand({256, 784}), x_b = torch::rand({256, 784});
  auto y_a = torch::randint(0, 10, {256}), y_b = torch::randint(0, 10, {256});
  // --8<-- [start:example]
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-3));
  natgrad::EWC ewc(model, natgrad::EWCOptions(/*lambda=*/100.0).mode("online").gamma(0.9));
  // ... train on task A, then:
  ewc.consolidate(x_a, y_a);               // or a std::vector of (inputs, targets) batches
  for (int step = 0; step < 10; ++step) {  // task B, kept close to A where A's Fisher is large
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(x_b), y_b) + ewc.penalty();
    loss.backward();
    opt.step();
  }
  torch::save(ewc, "/tmp/ewc.pt");  // Fisher, anchors and options
  natgrad::EWC restored(model);
  torch::load(restored, "/tmp/ewc.pt");
  // --8<-- [end:example]

  EXPECT_EQ(restored.options().lambda(), 100.0);
  EXPECT_EQ(restored.estimator().size(), 0u);  // nothing estimated by this object
  EXPECT_EQ(ewc.estimator().at("0.weight"), "linear_diag_fisher");
  EXPECT_GT(ewc.penalty().item<double>(), 0.0);
  EXPECT_TRUE(AllClose(restored.penalty(), ewc.penalty(), 0.0));
}

TEST(ApiEwc, InvalidOptionsNameTheOption) {
  auto net = make_model();
  auto make = [&](natgrad::EWCOptions o) { return [net, o] { natgrad::EWC ewc(net, o); }; };
  EXPECT_TRUE(ThrowsMentioning(make(natgrad::EWCOptions(-1.0)), {"lambda", "-1"}));
  EXPECT_TRUE(ThrowsMentioning(make(natgrad::EWCOptions(std::nan(""))), {"lambda"}));
  EXPECT_TRUE(ThrowsMentioning(make(natgrad::EWCOptions().gamma(1.5)), {"gamma", "1.5"}));
  EXPECT_TRUE(ThrowsMentioning(make(natgrad::EWCOptions().mode("both")), {"mode", "both"}));
  EXPECT_TRUE(
      ThrowsMentioning(make(natgrad::EWCOptions().fisher_type("true")), {"fisher_type", "true"}));
  EXPECT_TRUE(ThrowsMentioning(make(natgrad::EWCOptions().likelihood("poisson")),
                               {"likelihood", "poisson"}));
  EXPECT_TRUE(ThrowsMentioning(make(natgrad::EWCOptions().mc_samples(0)), {"mc_samples"}));
  // Options changed after construction are re-checked before anything is estimated.
  natgrad::EWC ewc(net, natgrad::EWCOptions(1.0));
  ewc.options().mode("sometimes");
  EXPECT_TRUE(
      ThrowsMentioning([&] { ewc.consolidate(fixture()["x1"], fixture()["y1"]); }, {"mode"}));
  EXPECT_TRUE(ewc.tasks().empty());
}

TEST(ApiEwc, NonFiniteDataOrFisherRaiseNamingTheTaskAndLeaveTheEwcUnchanged) {
  const Fixture& f = fixture();
  auto net = make_model();
  set_params(*net, "init/");
  natgrad::EWC ewc(net, natgrad::EWCOptions(3.0));
  ewc.consolidate(f["x1"], f["y1"]);
  const at::Tensor before = ewc.penalty();
  const int64_t revision = ewc.revision();
  at::Tensor x = f["x2"].clone();
  x[3][2] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(ThrowsMentioning([&] { ewc.consolidate(x, f["y2"]); }, {"task 1", "inputs", "NaN"}));
  EXPECT_TRUE(
      ThrowsMentioning([&] { ewc.consolidate(f["x2"], at::Tensor()); }, {"task 1", "targets"}));
  EXPECT_TRUE(ThrowsMentioning([&] { ewc.consolidate(f["x2"], f["y2"].narrow(0, 0, 4)); },
                               {"task 1", "targets", "one entry per input"}));
  EXPECT_TRUE(ThrowsMentioning([&] { ewc.consolidate(f["x2"], f["y2"] + 3); },
                               {"task 1", "class indices"}));
  EXPECT_TRUE(
      ThrowsMentioning([&] { ewc.consolidate(f["x2"].narrow(0, 0, 0), f["y2"].narrow(0, 0, 0)); },
                       {"task 1", "no samples"}));
  EXPECT_TRUE(ThrowsMentioning([&] { ewc.consolidate(std::vector<natgrad::EWC::Batch>{}); },
                               {"task 1", "no samples"}));
  natgrad::EWC gaussian(net, natgrad::EWCOptions(1.0).likelihood("gaussian"));
  at::Tensor yg = f["yg"].clone();
  yg[0][0] = std::numeric_limits<double>::infinity();
  EXPECT_TRUE(ThrowsMentioning([&] { gaussian.consolidate(f["x1"], yg); },
                               {"task 0", "targets", "NaN or Inf"}));
  EXPECT_TRUE(gaussian.tasks().empty());
  // Finite data, non-finite gradients: the Fisher itself is rejected, naming the parameters.
  {
    torch::NoGradGuard no_grad;
    net->named_parameters()["3.weight"][0][0] = std::numeric_limits<double>::infinity();
  }
  EXPECT_TRUE(
      ThrowsMentioning([&] { ewc.consolidate(f["x2"], f["y2"]); },
                       {"task 1", "Fisher", "3.weight", "not finite", "nothing was stored"}));
  set_params(*net, "init/");
  EXPECT_EQ(ewc.tasks().size(), 1u);
  EXPECT_EQ(ewc.revision(), revision);
  EXPECT_TRUE(AllClose(ewc.penalty(), before, 0.0));
}

TEST(ApiEwc, PenaltyRejectsMissingOrReshapedConsolidatedParameters) {
  auto net = make_model();
  set_params(*net, "init/");
  natgrad::EWC ewc(net, natgrad::EWCOptions(1.0));
  ewc.consolidate(fixture()["x1"], fixture()["y1"]);
  const std::string path =
      (std::filesystem::temp_directory_path() / "natgrad_ewc_missing.pt").string();
  torch::save(ewc, path);
  // A model with other parameter names: the consolidated ones no longer exist.
  torch::nn::Sequential other(torch::nn::Linear(6, 3));
  other->to(at::kDouble);
  natgrad::EWC elsewhere(other, natgrad::EWCOptions(1.0));
  torch::load(elsewhere, path);
  EXPECT_TRUE(ThrowsMentioning([&] { elsewhere.penalty(); }, {"no longer exist", "2.weight"}));
  // Same names, another width: a changed shape.
  torch::nn::Sequential wider(torch::nn::Linear(6, 7), torch::nn::Tanh(),
                              torch::nn::LayerNorm(torch::nn::LayerNormOptions({7})),
                              torch::nn::Linear(7, 3));
  wider->to(at::kDouble);
  natgrad::EWC reshaped(wider, natgrad::EWCOptions(1.0));
  torch::load(reshaped, path);
  std::remove(path.c_str());
  EXPECT_TRUE(ThrowsMentioning([&] { reshaped.penalty(); }, {"0.weight", "changed shape"}));
}

TEST(ApiEwc, LoadRejectsAnArchiveThatIsNotAnEwc) {
  auto net = make_model();
  const std::string path =
      (std::filesystem::temp_directory_path() / "natgrad_ewc_other.pt").string();
  torch::save(net, path);
  natgrad::EWC ewc(net, natgrad::EWCOptions(1.0));
  EXPECT_TRUE(ThrowsMentioning([&] { torch::load(ewc, path); }, {"not a natgrad::EWC archive"}));
  std::remove(path.c_str());
}

}  // namespace
