// Trains an MLP classifier on Fashion-MNIST (Debian's dataset-fashion-mnist IDX files) with
// torch::optim::SGD, torch::optim::Adam and natgrad::optim::KFAC for the same number of steps
// on the same minibatches, and prints a table like the main job's (scripts/main.sh): final
// training loss, test accuracy, wall-clock and the time each optimizer took to reach Adam's
// final loss.
//
//   build/cmake/examples/cpp/fashion_mnist_mlp [--steps 400] [--batch 256] [--hidden 512]
//       [--train-size 10000] [--test-size 2000] [--threads 1] [--seed 0] [--data DIR]
//
// The model is 784-H-H-10 (ReLU; H = --hidden, default 512: the main job's Fashion MLP) built
// from natgrad::nn::Linear layers, which behave exactly as torch::nn::Linear under SGD and Adam
// and record what K-FAC needs under natgrad::optim::KFAC. Exit code 77: the data is missing.
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "idx.h"
#include "natgrad.h"

namespace {

struct Args {
  int64_t steps = 400, batch = 256, hidden = 512, train_size = 10000, test_size = 2000;
  int64_t threads = 1, seed = 0, evals = 20;
  std::optional<std::string> data;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string key = argv[i];
    if (key == "--help" || key == "-h") {
      std::cout << "usage: fashion_mnist_mlp [--steps N] [--batch B] [--hidden H] [--train-size N]\n"
                   "       [--test-size N] [--threads T] [--seed S] [--evals E] [--data DIR]\n";
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument("missing value after " + key);
    const std::string value = argv[++i];
    if (key == "--data") {
      a.data = value;
      continue;
    }
    const int64_t v = std::stoll(value);
    if (v < 1) throw std::invalid_argument(key + " must be >= 1, got " + value);
    if (key == "--steps") a.steps = v;
    else if (key == "--batch") a.batch = v;
    else if (key == "--hidden") a.hidden = v;
    else if (key == "--train-size") a.train_size = v;
    else if (key == "--test-size") a.test_size = v;
    else if (key == "--threads") a.threads = v;
    else if (key == "--seed") a.seed = v;
    else if (key == "--evals") a.evals = v;
    else throw std::invalid_argument("unknown option " + key);
  }
  return a;
}

// --8<-- [start:model]
torch::nn::Sequential make_mlp(int64_t hidden, int64_t seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(natgrad::nn::Linear(784, hidden), torch::nn::ReLU(),
                               natgrad::nn::Linear(hidden, hidden), torch::nn::ReLU(),
                               natgrad::nn::Linear(hidden, 10));
}
// --8<-- [end:model]

struct Run {
  std::string name;
  std::vector<double> times, losses;  // training-set loss after each evaluation point
  double final_loss = 0, test_accuracy = 0, seconds = 0;
};

double mean_loss(torch::nn::Sequential& net, const natgrad_examples::Split& s) {
  torch::NoGradGuard no_grad;
  return torch::nn::functional::cross_entropy(net->forward(s.images), s.labels).item<double>();
}

using MakeOptimizer = std::function<std::unique_ptr<torch::optim::Optimizer>(torch::nn::Sequential&)>;

// Trains a fresh model (same initial weights and minibatch order for every optimizer); only the
// steps are timed (evaluations on the training subset are not).
Run train(const std::string& name, const MakeOptimizer& make, const Args& a,
          const natgrad_examples::Split& train_set, const natgrad_examples::Split& test_set) {
  auto net = make_mlp(a.hidden, a.seed);
  auto opt = make(net);
  Run run{name};
  auto gen = at::make_generator<at::CPUGeneratorImpl>(a.seed + 1);
  const int64_t every = std::max<int64_t>(a.steps / a.evals, 1);
  run.times.push_back(0.0);
  run.losses.push_back(mean_loss(net, train_set));
  double elapsed = 0;
  for (int64_t step = 1; step <= a.steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    const at::Tensor idx = at::randint(train_set.labels.size(0), {a.batch}, gen, at::kLong);
    const at::Tensor x = train_set.images.index_select(0, idx), y = train_set.labels.index_select(0, idx);
    // --8<-- [start:step]
    opt->zero_grad();
    torch::nn::functional::cross_entropy(net->forward(x), y).backward();
    opt->step();
    // --8<-- [end:step]
    elapsed += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (step % every == 0 || step == a.steps) {
      run.times.push_back(elapsed);
      run.losses.push_back(mean_loss(net, train_set));
    }
  }
  run.seconds = elapsed;
  run.final_loss = run.losses.back();
  torch::NoGradGuard no_grad;
  run.test_accuracy =
      net->forward(test_set.images).argmax(1).eq(test_set.labels).to(at::kDouble).mean().item<double>();
  return run;
}

// The first evaluation point at which `run` reached `target` (linear interpolation of time is
// not attempted: the time of that point), or a negative value.
double time_to(const Run& run, double target) {
  for (size_t i = 0; i < run.losses.size(); ++i) {
    if (run.losses[i] <= target) return run.times[i];
  }
  return -1.0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  try {
    a = parse(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "fashion_mnist_mlp: " << e.what() << " (see --help)\n";
    return 2;
  }
  const std::string dir = natgrad_examples::fashion_mnist_dir(a.data);
  if (!natgrad_examples::fashion_mnist_present(dir)) {
    std::cerr << "fashion_mnist_mlp: Fashion-MNIST not found in " << dir
              << " (apt-get install dataset-fashion-mnist, or --data DIR)\n";
    return 77;
  }
  at::set_num_threads(static_cast<int>(a.threads));
  const auto train_set = natgrad_examples::load_fashion_mnist(dir, "train", a.train_size);
  const auto test_set = natgrad_examples::load_fashion_mnist(dir, "t10k", a.test_size);
  std::printf("Fashion-MNIST MLP 784-%lld-%lld-10: %lld train / %lld test images, %lld steps of batch %lld, "
              "%lld thread(s)\n",
              (long long)a.hidden, (long long)a.hidden, (long long)train_set.labels.size(0),
              (long long)test_set.labels.size(0), (long long)a.steps, (long long)a.batch, (long long)a.threads);

  std::vector<std::pair<std::string, MakeOptimizer>> optimizers = {
      {"SGD", [](torch::nn::Sequential& net) -> std::unique_ptr<torch::optim::Optimizer> {
         return std::make_unique<torch::optim::SGD>(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
       }},
      {"Adam", [](torch::nn::Sequential& net) -> std::unique_ptr<torch::optim::Optimizer> {
         return std::make_unique<torch::optim::Adam>(net->parameters(), torch::optim::AdamOptions(1e-3));
       }},
      // --8<-- [start:kfac]
      {"KFAC", [](torch::nn::Sequential& net) -> std::unique_ptr<torch::optim::Optimizer> {
         natgrad::optim::KFACOptions o(0.3);
         o.momentum(0.9).damping(1e-3).kl_clip(1e-3).factor_update_period(1).inverse_update_period(10)
             .inverse_method("eigen");
         return std::make_unique<natgrad::optim::KFAC>(net, o);
       }},
      // --8<-- [end:kfac]
  };
  std::vector<Run> runs;
  for (const auto& [name, make] : optimizers) {
    runs.push_back(train(name, make, a, train_set, test_set));
    std::fflush(stdout);
  }
  double adam_final = 0;
  for (const Run& r : runs) {
    if (r.name == "Adam") adam_final = r.final_loss;
  }
  std::printf("\n%-8s %16s %14s %14s %26s\n", "", "final train loss", "test accuracy", "wall-clock (s)",
              "time to Adam's final loss");
  for (const Run& r : runs) {
    const double t = time_to(r, adam_final);
    char reach[64];
    if (t < 0) std::snprintf(reach, sizeof(reach), "not reached");
    else std::snprintf(reach, sizeof(reach), "%.2f s (%.2fx Adam)", t, t / runs[1].seconds);
    std::printf("%-8s %16.4f %14.4f %14.2f %26s\n", r.name.c_str(), r.final_loss, r.test_accuracy, r.seconds, reach);
  }
  return 0;
}
