// The models, data and cases of the C++ frontend's K-FAC tests, mirroring
// tests/fixtures/make_kfac_parity.py (which wrote tests/fixtures/kfac_parity.pt with natgrad.KFAC).
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "natgrad.h"
#include "test_fixtures.h"

namespace natgrad_test {

inline constexpr int kParitySteps = 10;

/// Embedding -> mean over positions -> Linear (EmbeddingBag of the fixture script).
struct EmbeddingBagImpl : torch::nn::Module {
  EmbeddingBagImpl()
      : emb(register_module("emb", natgrad::nn::Embedding(10, 4))),
        fc(register_module("fc", natgrad::nn::Linear(4, 3))) {}
  torch::Tensor forward(const torch::Tensor& idx) { return fc(emb(idx).mean(1)); }
  natgrad::nn::Embedding emb;
  natgrad::nn::Linear fc;
};
TORCH_MODULE(EmbeddingBag);

/// A model and its forward.
struct Model {
  std::shared_ptr<torch::nn::Module> module;
  std::function<torch::Tensor(const torch::Tensor&)> forward;
};

/// The fixture's tensors by key.
inline const std::map<std::string, torch::Tensor>& fixture() {
  static const std::map<std::string, torch::Tensor> data = [] {
    const std::string path = source_path("tests/fixtures/kfac_parity.pt");
    std::ifstream in(path, std::ios::binary);
    TORCH_CHECK(in.good(), "cannot open ", path);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::map<std::string, torch::Tensor> out;
    for (const auto& item : torch::pickle_load(bytes).toGenericDict()) {
      out[item.key().toStringRef()] = item.value().toTensor();
    }
    return out;
  }();
  return data;
}

inline const torch::Tensor& fixture_tensor(const std::string& key) {
  auto it = fixture().find(key);
  TORCH_CHECK(it != fixture().end(), "fixture has no entry ", key);
  return it->second;
}

/// Model `name` of the fixture with natgrad::nn layers, float64, its initial weights loaded.
inline Model make_model(const std::string& name) {
  Model m;
  if (name == "mlp") {
    torch::nn::Sequential s(natgrad::nn::Linear(6, 8), torch::nn::Tanh(),
                            natgrad::nn::Linear(8, 4));
    m = {s.ptr(), [s](const torch::Tensor& x) mutable { return s->forward(x); }};
  } else if (name == "mlpnorm") {
    torch::nn::Sequential s(natgrad::nn::Linear(6, 8),
                            torch::nn::LayerNorm(torch::nn::LayerNormOptions({8})),
                            torch::nn::Tanh(), natgrad::nn::Linear(8, 4));
    m = {s.ptr(), [s](const torch::Tensor& x) mutable { return s->forward(x); }};
  } else if (name == "cnn") {
    torch::nn::Sequential s(natgrad::nn::Conv2d(torch::nn::Conv2dOptions(1, 3, 3).padding(1)),
                            torch::nn::ReLU(),
                            natgrad::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3).stride(2)),
                            torch::nn::ReLU(), torch::nn::Flatten(), natgrad::nn::Linear(36, 3));
    m = {s.ptr(), [s](const torch::Tensor& x) mutable { return s->forward(x); }};
  } else {
    EmbeddingBag e;
    m = {e.ptr(), [e](const torch::Tensor& x) mutable { return e->forward(x); }};
  }
  m.module->to(torch::kDouble);
  torch::NoGradGuard guard;
  for (auto& item : m.module->named_parameters()) {
    item.value().copy_(fixture_tensor(name + "/init/" + item.key()));
  }
  return m;
}

/// One parity case: the options of make_kfac_parity.py's CASES on top of COMMON.
struct Case {
  std::string name, model, method;
  int64_t factor_period = 1, inverse_period = 1;
  double weight_decay = 0.0, momentum = 0.9;
  std::optional<double> kl_clip = 1e-3;
  std::optional<bool> pi_correction = std::nullopt;
  std::string reduction = "mean";
  bool eval_first = false;

  natgrad::optim::KFACOptions options() const {
    natgrad::optim::KFACOptions o(0.1);
    o.momentum(momentum)
        .damping(1e-2)
        .factor_decay(0.9)
        .kl_clip(kl_clip)
        .weight_decay(weight_decay)
        .factor_update_period(factor_period)
        .inverse_update_period(inverse_period)
        .inverse_method(method)
        .pi_correction(pi_correction)
        .loss_reduction(reduction);
    return o;
  }
};

/// gtest prints a case by its name.
inline void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

inline std::vector<Case> parity_cases() {
  std::vector<Case> cases;
  for (std::string model : {"mlp", "cnn", "emb"}) {
    for (std::string method : {"eigen", "inverse"}) {
      cases.push_back({model + "_" + method + "_11", model, method, 1, 1});
      cases.push_back({model + "_" + method + "_23", model, method, 2, 3});
    }
  }
  Case wd{"mlp_eigen_11_wd", "mlp", "eigen", 1, 1};
  wd.weight_decay = 1e-2;
  Case pi_off{"mlp_inverse_23_pi_off", "mlp", "inverse", 2, 3};
  pi_off.pi_correction = false;
  Case pi_sum{"mlp_eigen_11_pi_sum", "mlp", "eigen", 1, 1};
  pi_sum.pi_correction = true;
  pi_sum.reduction = "sum";
  Case noclip{"mlp_eigen_11_noclip", "mlp", "eigen", 1, 1};
  noclip.kl_clip = std::nullopt;
  noclip.momentum = 0.0;
  Case nomomentum{"mlp_eigen_11_nomomentum", "mlp", "eigen", 1, 1};
  nomomentum.momentum = 0.0;
  Case evalfirst{"mlp_inverse_23_evalfirst", "mlp", "inverse", 2, 3};
  evalfirst.eval_first = true;
  Case norm{"mlpnorm_eigen_23", "mlpnorm", "eigen", 2, 3};
  Case cnn_tokens{"cnn_eigen_11_token_mean", "cnn", "eigen", 1, 1};
  cnn_tokens.reduction = "token_mean";
  Case emb_tokens{"emb_inverse_11_token_mean", "emb", "inverse", 1, 1};
  emb_tokens.reduction = "token_mean";
  for (const Case& c :
       {wd, pi_off, pi_sum, noclip, nomomentum, evalfirst, cnn_tokens, emb_tokens, norm}) {
    cases.push_back(c);
  }
  return cases;
}

/// Steps [first, last) of a case's training loop (the fixture's batches).
inline void train(Model& m, natgrad::optim::KFAC& opt, const Case& c, int first, int last) {
  const torch::Tensor& x = fixture_tensor(c.model + "/x");
  const torch::Tensor& y = fixture_tensor(c.model + "/y");
  namespace F = torch::nn::functional;
  auto options = F::CrossEntropyFuncOptions();
  if (c.reduction == "sum") {
    options.reduction(torch::kSum);
  } else {
    options.reduction(torch::kMean);
  }
  for (int k = first; k < last; ++k) {
    m.module->train(!(c.eval_first && k == 0));
    opt.zero_grad();
    torch::Tensor loss = F::cross_entropy(m.forward(x[k]), y[k], options);
    loss.backward();
    opt.step();
  }
}

}  // namespace natgrad_test
