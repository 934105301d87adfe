// natgrad::optim::KFAC beyond parity: exact resume, option checks, NaN/Inf skips, the plain-
// gradient fallback against its formula, the fallback-ladder warning and describe().
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <sstream>

#include "test_frontend_kfac_models.h"
#include "test_helpers.h"

namespace {

using natgrad::optim::KFAC;
using natgrad::optim::KFACOptions;
using natgrad_test::Case;

// Collects every TORCH_WARN while alive.
struct Warnings : c10::WarningHandler {
  Warnings() : guard(this) {}
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
  size_t count(const std::string& needle) const {
    size_t n = 0;
    for (const auto& m : messages) n += m.find(needle) != std::string::npos;
    return n;
  }
  std::vector<std::string> messages;
  c10::WarningUtils::WarningHandlerGuard guard;
};

std::map<std::string, torch::Tensor> snapshot(const natgrad_test::Model& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& item : m.module->named_parameters())
    out[item.key()] = item.value().detach().clone();
  return out;
}

// ---- resume ---------------------------------------------------------------------------------

class ApiKfacResume : public ::testing::TestWithParam<Case> {};

TEST_P(ApiKfacResume, SaveAfterFiveStepsLoadIntoFreshOptimizerEqualsUninterruptedRun) {
  const Case& c = GetParam();
  natgrad_test::Model straight = natgrad_test::make_model(c.model);
  KFAC opt_straight(straight.module, c.options());
  natgrad_test::train(straight, opt_straight, c, 0, 10);

  natgrad_test::Model first = natgrad_test::make_model(c.model);
  const std::string path = ::testing::TempDir() + "natgrad_kfac_resume_" + c.name + ".pt";
  {
    KFAC opt(first.module, c.options());
    natgrad_test::train(first, opt, c, 0, 5);
    torch::save(opt, path);
  }
  natgrad_test::Model resumed = natgrad_test::make_model(c.model);  // fresh model and optimizer
  {
    torch::NoGradGuard guard;
    auto from = first.module->named_parameters();
    for (auto& item : resumed.module->named_parameters()) item.value().copy_(from[item.key()]);
  }
  KFAC opt(resumed.module, c.options());
  torch::load(opt, path);
  std::remove(path.c_str());
  EXPECT_EQ(opt.steps(), 5);
  natgrad_test::train(resumed, opt, c, 5, 10);
  auto expected = straight.module->named_parameters();
  for (const auto& item : resumed.module->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), expected[item.key()])) << c.name << ": " << item.key();
  }
}

std::vector<Case> resume_cases() {
  Case mlp{"mlp_inverse_23", "mlp", "inverse", 2, 3};
  Case cnn{"cnn_eigen_23", "cnn", "eigen", 2, 3};
  Case emb{"emb_eigen_23", "emb", "eigen", 2, 3};
  Case norm{"mlpnorm_eigen_11", "mlpnorm", "eigen", 1, 1};
  return {mlp, cnn, emb, norm};
}

INSTANTIATE_TEST_SUITE_P(Cases, ApiKfacResume, ::testing::ValuesIn(resume_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

TEST(ApiKfac, LoadRejectsAnotherModelsCheckpointAndChangesNothing) {
  Case c{"mlp_eigen_11", "mlp", "eigen", 1, 1};
  natgrad_test::Model mlp = natgrad_test::make_model("mlp");
  KFAC opt_mlp(mlp.module, c.options());
  natgrad_test::train(mlp, opt_mlp, c, 0, 2);
  std::ostringstream saved;
  torch::serialize::OutputArchive out;
  opt_mlp.save(out);
  out.save_to(saved);

  Case cnn_case{"cnn_eigen_11", "cnn", "eigen", 1, 1};
  natgrad_test::Model cnn = natgrad_test::make_model("cnn");
  KFAC opt_cnn(cnn.module, cnn_case.options());
  natgrad_test::train(cnn, opt_cnn, cnn_case, 0, 1);
  const auto before = opt_cnn.blocks()[0]->state.at("A").clone();
  std::istringstream in_stream(saved.str());
  torch::serialize::InputArchive in;
  in.load_from(in_stream);
  // "0" exists in both models (a Linear there, a Conv2d here): the kind check names it.
  EXPECT_TRUE(
      natgrad_test::ThrowsMentioning([&] { opt_cnn.load(in); }, {"'0'", "linear", "conv2d"}));
  EXPECT_EQ(opt_cnn.steps(), 1);
  EXPECT_TRUE(torch::equal(opt_cnn.blocks()[0]->state.at("A"), before));
}

// ---- options --------------------------------------------------------------------------------

TEST(ApiKfac, InvalidOptionsThrowNamingTheOption) {
  natgrad_test::Model m = natgrad_test::make_model("mlp");
  auto throws = [&](const KFACOptions& o, const char* needle) {
    return natgrad_test::ThrowsMentioning([&] { KFAC opt(m.module, o); }, {needle});
  };
  EXPECT_TRUE(throws(KFACOptions(-1.0), "Invalid lr: -1"));
  EXPECT_TRUE(throws(KFACOptions(std::nan("")), "Invalid lr: nan"));
  EXPECT_TRUE(throws(KFACOptions().momentum(1.0), "Invalid momentum: 1 (must be < 1)"));
  EXPECT_TRUE(throws(KFACOptions().momentum(-0.1), "Invalid momentum"));
  EXPECT_TRUE(throws(KFACOptions().weight_decay(-1e-3), "Invalid weight_decay"));
  EXPECT_TRUE(throws(KFACOptions().damping(0.0), "Invalid damping: 0 (must be > 0)"));
  EXPECT_TRUE(throws(KFACOptions().damping(INFINITY), "Invalid damping: inf"));
  EXPECT_TRUE(throws(KFACOptions().factor_decay(1.0), "Invalid factor_decay"));
  EXPECT_TRUE(throws(KFACOptions().factor_decay(-0.5), "Invalid factor_decay"));
  EXPECT_TRUE(throws(KFACOptions().factor_update_period(0), "Invalid factor_update_period: 0"));
  EXPECT_TRUE(throws(KFACOptions().inverse_update_period(-2), "Invalid inverse_update_period: -2"));
  EXPECT_TRUE(throws(KFACOptions().kl_clip(0.0), "Invalid kl_clip: 0 (must be > 0)"));
  EXPECT_TRUE(
      throws(KFACOptions().inverse_method("cholesky"), "Invalid inverse_method: 'cholesky'"));
  EXPECT_TRUE(throws(KFACOptions().loss_reduction("max"), "Invalid loss_reduction: 'max'"));
  EXPECT_TRUE(natgrad_test::ThrowsMentioning(
      [] {
        KFAC opt{std::shared_ptr<torch::nn::Module>(), KFACOptions()};
      },
      {"Invalid model"}));
  // A group's own options are checked and named with the group.
  auto params = m.module->parameters();
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{params[0], params[1]});
  groups.emplace_back(std::vector<torch::Tensor>{params[2], params[3]},
                      std::make_unique<KFACOptions>(KFACOptions(0.1).damping(-1.0)));
  EXPECT_TRUE(natgrad_test::ThrowsMentioning([&] { KFAC opt(m.module, groups, KFACOptions(0.1)); },
                                             {"Invalid damping in param group 1"}));
  // Options edited after construction are checked by step(), before anything changes.
  KFAC opt(m.module, KFACOptions(0.1));
  static_cast<KFACOptions&>(opt.param_groups()[0].options()).lr(-2.0);
  const auto x = natgrad_test::fixture_tensor("mlp/x")[0];
  const auto y = natgrad_test::fixture_tensor("mlp/y")[0];
  torch::nn::functional::cross_entropy(m.forward(x), y).backward();
  const auto before = snapshot(m);
  EXPECT_TRUE(natgrad_test::ThrowsMentioning([&] { opt.step(); }, {"Invalid lr in param group 0"}));
  for (const auto& item : m.module->named_parameters())
    EXPECT_TRUE(torch::equal(item.value(), before.at(item.key())));
  EXPECT_EQ(opt.steps(), 0);
}

TEST(ApiKfac, PerGroupLearningRateAppliesToItsParametersOnly) {
  natgrad_test::Model m = natgrad_test::make_model("mlp");
  auto params = m.module->parameters();
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{params[0], params[1]});
  groups.emplace_back(std::vector<torch::Tensor>{params[2], params[3]},
                      std::make_unique<KFACOptions>(KFACOptions(0.0)));
  KFAC opt(m.module, groups, KFACOptions(0.1));
  Case c{"mlp", "mlp", "eigen", 1, 1};
  const auto before = snapshot(m);
  natgrad_test::train(m, opt, c, 0, 3);
  EXPECT_FALSE(torch::equal(params[0], before.at("0.weight")));
  EXPECT_TRUE(torch::equal(params[2], before.at("2.weight")));  // lr 0: never moves
  EXPECT_EQ(opt.blocks().size(), 2u);
}

TEST(ApiKfac, StepWithClosureEqualsTheExplicitLoopAndReturnsTheLoss) {
  Case c{"mlp_eigen_11", "mlp", "eigen", 1, 1};
  natgrad_test::Model loop = natgrad_test::make_model("mlp");
  KFAC opt_loop(loop.module, c.options());
  natgrad_test::train(loop, opt_loop, c, 0, 4);
  natgrad_test::Model closed = natgrad_test::make_model("mlp");
  KFAC opt(closed.module, c.options());
  for (int k = 0; k < 4; ++k) {
    const auto x = natgrad_test::fixture_tensor("mlp/x")[k];
    const auto y = natgrad_test::fixture_tensor("mlp/y")[k];
    torch::NoGradGuard no_grad;  // step() enables grad for the closure, as torch::optim does
    torch::Tensor loss = opt.step([&] {
      opt.zero_grad();
      torch::Tensor l = torch::nn::functional::cross_entropy(closed.forward(x), y);
      l.backward();
      return l;
    });
    ASSERT_TRUE(loss.defined());
    EXPECT_TRUE(std::isfinite(loss.item<double>()));
  }
  auto expected = loop.module->named_parameters();
  for (const auto& item : closed.module->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), expected[item.key()])) << item.key();
  }
}

// ---- faults ---------------------------------------------------------------------------------

TEST(ApiKfac, NanInBatchSkipsEveryLayerItReachesAndTrainingGoesOn) {
  Case c{"mlpnorm_eigen_11", "mlpnorm", "eigen", 1, 1};
  natgrad_test::Model m = natgrad_test::make_model("mlpnorm");
  KFAC opt(m.module, c.options());
  natgrad_test::train(m, opt, c, 0, 3);
  EXPECT_TRUE(opt.nonfinite_skips().empty());
  const auto before = snapshot(m);
  auto bad = [&] {
    torch::Tensor x = natgrad_test::fixture_tensor("mlpnorm/x")[3].clone();
    x[0][0] = std::nan("");
    opt.zero_grad();
    torch::nn::functional::cross_entropy(m.forward(x), natgrad_test::fixture_tensor("mlpnorm/y")[3])
        .backward();
    opt.step();
  };
  Warnings warnings;
  bad();
  for (const auto& item : m.module->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), before.at(item.key()))) << item.key();
  }
  const std::map<std::string, int64_t> once{{"0", 1}, {"1.bias", 1}, {"1.weight", 1}, {"3", 1}};
  EXPECT_EQ(opt.nonfinite_skips(), once);
  EXPECT_EQ(warnings.count("NaN or Inf"), 4u);
  EXPECT_EQ(warnings.count("activations or output gradients of layer '0'"), 1u);
  EXPECT_EQ(warnings.count("gradients of parameter '1.weight'"), 1u);
  const auto factors = opt.blocks()[0]->state.at("A").clone();
  bad();  // counted again, warned once
  EXPECT_EQ(opt.nonfinite_skips().at("0"), 2);
  EXPECT_EQ(warnings.count("NaN or Inf"), 4u);
  EXPECT_TRUE(torch::equal(opt.blocks()[0]->state.at("A"), factors));
  natgrad_test::train(m, opt, c, 4, 10);
  for (const auto& item : m.module->named_parameters()) {
    EXPECT_TRUE(natgrad_test::AllFinite(item.value())) << item.key();
    EXPECT_FALSE(torch::equal(item.value(), before.at(item.key()))) << item.key();
  }
  EXPECT_EQ(opt.steps(), 11);
}

class ApiKfacLadder : public natgrad_test::LadderTest {};

TEST_F(ApiKfacLadder, FallbackRungWarnsOncePerLayerAndStepsStayFinite) {
  Case c{"mlp_eigen_11", "mlp", "eigen", 1, 1};
  natgrad_test::Model m = natgrad_test::make_model("mlp");
  KFAC opt(m.module, c.options());
  Warnings warnings;
  natgrad::testing::force_ladder_failures(1);  // the first decomposition climbs a rung
  natgrad_test::train(m, opt, c, 0, 1);
  natgrad::testing::force_ladder_failures(1);
  natgrad_test::train(m, opt, c, 1, 2);
  EXPECT_EQ(warnings.count("fallback-ladder rung"), 1u);
  EXPECT_EQ(warnings.count("factors of '0'"), 1u);
  for (const auto& p : m.module->parameters()) EXPECT_TRUE(natgrad_test::AllFinite(p));
}

// ---- the plain-gradient fallback --------------------------------------------------------------

TEST(ApiKfac, PlainModulesFollowTheTrustRegionMomentumFormula) {
  torch::manual_seed(5);
  torch::nn::Sequential net(torch::nn::Linear(3, 2));
  net->to(torch::kDouble);
  const double lr = 0.1, mu = 0.9, wd = 0.01, kl = 1e-4;
  KFAC opt(net, KFACOptions(lr).momentum(mu).weight_decay(wd).kl_clip(kl));
  std::vector<torch::Tensor> p, b;
  for (const auto& q : net->parameters()) p.push_back(q.detach().clone());
  std::vector<torch::Tensor> shares(p.size());
  for (int k = 0; k < 3; ++k) {
    auto x = torch::randn({5, 3}, torch::kDouble);
    opt.zero_grad();
    net->forward(x).pow(2).sum().backward();
    std::vector<torch::Tensor> g;
    for (const auto& q : net->parameters()) g.push_back(q.grad().clone());
    double total = 0;
    std::vector<double> terms;
    for (size_t i = 0; i < p.size(); ++i) {
      double t = (g[i] * g[i]).sum().item<double>();
      if (k > 0)
        t += 2 * mu * (b[i] * g[i]).sum().item<double>() + mu * mu * shares[i].item<double>();
      terms.push_back(t);
      total += t * lr * lr;
    }
    const double nu = std::min(1.0, std::sqrt(kl / total));
    for (size_t i = 0; i < p.size(); ++i) {
      shares[i] = torch::tensor(terms[i] * nu * nu, torch::kDouble);
      torch::Tensor d = nu * g[i] + wd * p[i];
      if (k == 0)
        b.push_back(d);
      else
        b[i] = mu * nu * b[i] + d;
      p[i] = p[i] - lr * b[i];
    }
    opt.step();
    auto params = net->parameters();
    for (size_t i = 0; i < p.size(); ++i)
      EXPECT_TRUE(natgrad_test::AllClose(params[i], p[i], 1e-12, 1e-14)) << k;
    if (k == 0) EXPECT_LT(nu, 1.0);  // the trust region is active
  }
  EXPECT_TRUE(opt.blocks().empty());
}

TEST(ApiKfac, ALayerRegisteredTwiceGetsOneBlock) {
  natgrad::nn::Linear shared(3, 3);
  torch::nn::Sequential net(shared, torch::nn::Tanh(), shared);
  KFAC opt(net, KFACOptions(0.1));
  ASSERT_EQ(opt.blocks().size(), 1u);
  EXPECT_EQ(shared->attached(), 1u);
  net->forward(torch::randn({4, 3})).sum().backward();
  opt.step();  // two calls of one layer: one factor update from both
  EXPECT_TRUE(opt.blocks()[0]->has_factors());
  EXPECT_TRUE(opt.nonfinite_skips().empty());
}

// ---- describe -----------------------------------------------------------------------------------

struct DescribeNetImpl : torch::nn::Module {
  DescribeNetImpl()
      : scale(register_parameter("scale", torch::ones({}))),
        fc(register_module("fc", natgrad::nn::Linear(3, 4))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({4})))),
        head(register_module("head", torch::nn::Linear(4, 2))),
        conv(register_module("conv",
                             natgrad::nn::Conv2d(torch::nn::Conv2dOptions(2, 2, 1).groups(2)))),
        frozen(register_module("frozen", natgrad::nn::Linear(2, 2))) {
    frozen->bias.set_requires_grad(false);
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(norm(fc(x))) * scale; }
  torch::Tensor scale;
  natgrad::nn::Linear fc;
  torch::nn::LayerNorm norm;
  torch::nn::Linear head;
  natgrad::nn::Conv2d conv;
  natgrad::nn::Linear frozen;
};
TORCH_MODULE(DescribeNet);

std::string row(const std::string& name, const std::string& shape, const std::string& how) {
  return name + std::string(13 - name.size(), ' ') + "  " + shape +
         std::string(7 - shape.size(), ' ') + "  " + how;
}

TEST(ApiKfac, DescribeListsEveryParameterAndItsPreconditioner) {
  DescribeNet net;
  auto opt = std::make_unique<KFAC>(net, KFACOptions(0.1));
  const std::string waiting =
      "plain gradient until its hooks fire (none so far: is the layer used functionally?)";
  const std::string not_layer = "not a natgrad::nn capture layer (Linear, Conv2d, Embedding)";
  auto table = [&](const std::string& fc) {
    return row("parameter", "shape", "preconditioner") + "\n" +
           row("scale", "scalar", "plain gradient: DescribeNet '': " + not_layer) + "\n" +
           row("fc.weight", "4x3", fc) + "\n" + row("fc.bias", "4", fc) + "\n" +
           row("norm.weight", "4", "plain gradient: LayerNorm 'norm': " + not_layer) + "\n" +
           row("norm.bias", "4", "plain gradient: LayerNorm 'norm': " + not_layer) + "\n" +
           row("head.weight", "2x4", "plain gradient: Linear 'head': " + not_layer) + "\n" +
           row("head.bias", "2", "plain gradient: Linear 'head': " + not_layer) + "\n" +
           row("conv.weight", "2x1x1x1",
               "plain gradient: Conv2d 'conv': grouped convolution (groups=2)") +
           "\n" +
           row("conv.bias", "2", "plain gradient: Conv2d 'conv': grouped convolution (groups=2)") +
           "\n" +
           row("frozen.weight", "2x2",
               "plain gradient: Linear 'frozen': only some of its parameters are optimized") +
           "\n" +
           row("frozen.bias", "2",
               "plain gradient: Linear 'frozen': frozen (requires_grad=False) when "
               "natgrad::optim::KFAC was built");
  };
  EXPECT_EQ(opt->describe(), table(waiting));
  net->forward(torch::randn({4, 3})).sum().backward();
  opt->step();
  EXPECT_EQ(opt->describe(), table("K-FAC linear (expand)"));
  ASSERT_EQ(opt->blocks().size(), 1u);
  EXPECT_EQ(net->fc->attached(), 1u);
  opt.reset();  // the optimizer is gone: the layer no longer records
  EXPECT_EQ(net->fc->attached(), 0u);
}

}  // namespace
