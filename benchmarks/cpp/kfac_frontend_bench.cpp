// The C++ frontend's K-FAC step, timed for benchmarks/cpp_frontend.py (which starts this program,
// gives it the model and data, times the Python natgrad.KFAC step and the bare-ATen floor in its
// own process, and prints the comparison).
//
//   kfac_frontend_bench --data FILE [--method eigen] [--threads 1]
//
// FILE is a torch.save'd dict (read with torch::pickle_load): "widths" (int64 [L+1]: an MLP of
// natgrad::nn::Linear layers with ReLU between them), "params/<name>" (initial parameters, the
// Python model's state), "x/<i>", "y/<i>" (the minibatches, cycled), and the hyperparameters
// "lr", "momentum", "damping", "kl_clip", "factor_decay" (0-d tensors).
// Then it reads commands on stdin, one per line, and answers each on stdout:
//   warm N              trains N steps at periods (1, 10); answers "ok"
//   time FP IP STEPS    sets the periods, trains STEPS steps; answers "<wall s> <cpu s>" (totals)
//   sgd STEPS           STEPS steps of torch::optim::SGD (lr 0.01, momentum 0.9) on a copy of the
//                       model made at its first call (the floor's SGD part, timed in C++);
//                       answers "<wall s> <cpu s>"
//   quit
#include <torch/torch.h>

#include <time.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "natgrad.h"

namespace {

double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

std::map<std::string, at::Tensor> load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "cannot open --data ", path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::map<std::string, at::Tensor> out;
  for (const auto& item : torch::pickle_load(bytes).toGenericDict()) {
    out[item.key().toStringRef()] = item.value().toTensor();
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::string data, method = "eigen";
  int threads = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    if (key == "--data") data = argv[i + 1];
    else if (key == "--method") method = argv[i + 1];
    else if (key == "--threads") threads = std::stoi(argv[i + 1]);
    else {
      std::cerr << "unknown option " << key << "\n";
      return 2;
    }
  }
  if (data.empty()) {
    std::cerr << "usage: kfac_frontend_bench --data FILE [--method eigen] [--threads 1]\n";
    return 2;
  }
  at::set_num_threads(threads);
  auto values = load(data);
  const at::Tensor widths = values.at("widths");
  torch::nn::Sequential net;
  for (int64_t l = 0; l + 1 < widths.numel(); ++l) {
    if (l > 0) net->push_back(torch::nn::ReLU());
    net->push_back(natgrad::nn::Linear(widths[l].item<int64_t>(), widths[l + 1].item<int64_t>()));
  }
  {
    torch::NoGradGuard no_grad;
    for (auto& item : net->named_parameters()) item.value().copy_(values.at("params/" + item.key()));
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> batches;
  for (int i = 0; values.count("x/" + std::to_string(i)); ++i) {
    batches.emplace_back(values.at("x/" + std::to_string(i)), values.at("y/" + std::to_string(i)));
  }
  TORCH_CHECK(!batches.empty(), "--data holds no batches (x/0, y/0, ...)");
  auto hyper = [&](const char* key) { return values.at(key).item<double>(); };
  natgrad::optim::KFACOptions options(hyper("lr"));
  options.momentum(hyper("momentum")).damping(hyper("damping")).kl_clip(hyper("kl_clip"))
      .factor_decay(hyper("factor_decay")).factor_update_period(1).inverse_update_period(10)
      .inverse_method(method);
  natgrad::optim::KFAC opt(net, options);
  // The periods are optimizer-wide (defaults(), as natgrad.KFAC's attributes); the group's copy
  // is kept equal.
  auto set_periods = [&](int64_t fp, int64_t ip) {
    for (auto* o : {&static_cast<natgrad::optim::KFACOptions&>(opt.defaults()),
                    &static_cast<natgrad::optim::KFACOptions&>(opt.param_groups()[0].options())}) {
      o->factor_update_period(fp).inverse_update_period(ip);
    }
  };

  size_t next = 0;
  auto train = [&](int64_t steps) {
    for (int64_t s = 0; s < steps; ++s) {
      const auto& [x, y] = batches[next++ % batches.size()];
      opt.zero_grad();
      torch::nn::functional::cross_entropy(net->forward(x), y).backward();
      opt.step();
    }
  };
  torch::nn::Sequential sgd_net;
  std::unique_ptr<torch::optim::SGD> sgd;
  size_t sgd_next = 0;
  auto timed = [](const std::function<void()>& fn) {
    const double cpu = cpu_seconds();
    const auto wall = std::chrono::steady_clock::now();
    fn();
    const double wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - wall).count();
    std::cout << wall_s << " " << cpu_seconds() - cpu << std::endl;
  };
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream cmd(line);
    std::string op;
    cmd >> op;
    if (op == "quit") break;
    if (op == "warm") {
      int64_t n = 0;
      cmd >> n;
      set_periods(1, 10);
      train(n);
      std::cout << "ok" << std::endl;
    } else if (op == "time") {
      int64_t fp = 1, ip = 1, steps = 1;
      cmd >> fp >> ip >> steps;
      set_periods(fp, ip);
      timed([&] { train(steps); });
    } else if (op == "sgd") {
      int64_t steps = 1;
      cmd >> steps;
      if (!sgd) {
        sgd_net = torch::nn::Sequential();
        for (const auto& layer : *net) {
          if (auto* linear = layer.ptr()->as<torch::nn::Linear>()) {
            torch::nn::Linear copy(linear->options);
            torch::NoGradGuard no_grad;
            copy->weight.copy_(linear->weight);
            copy->bias.copy_(linear->bias);
            sgd_net->push_back(copy);
          } else {
            sgd_net->push_back(torch::nn::ReLU());
          }
        }
        sgd = std::make_unique<torch::optim::SGD>(sgd_net->parameters(),
                                                  torch::optim::SGDOptions(0.01).momentum(0.9));
      }
      timed([&] {
        for (int64_t s = 0; s < steps; ++s) {
          const auto& [x, y] = batches[sgd_next++ % batches.size()];
          sgd->zero_grad();
          torch::nn::functional::cross_entropy(sgd_net->forward(x), y).backward();
          sgd->step();
        }
      });
    } else {
      std::cout << "error unknown command " << op << std::endl;
    }
  }
  return 0;
}
