"""natgrad.integrations.avalanche: an Avalanche strategy with natgrad's EWC plugin (diagonal and
Kronecker, attached to natgrad.KFAC) and with natgrad.KFAC as its optimizer, on two permuted-digits
experiences (scikit-learn's load_digits, a tiny MLP).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad

pytest.importorskip("avalanche.training")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets  # noqa: E402
from avalanche.benchmarks.utils import as_classification_dataset  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from natgrad.integrations.avalanche import EWCPlugin, KFACPlugin  # noqa: E402


def permuted_digits(tasks=2, train=600, test=300):
    digits = sklearn_datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perms = [torch.arange(64)] + [torch.randperm(64, generator=g) for _ in range(tasks - 1)]
    def make(a, b):
        data = torch.utils.data.TensorDataset(a, b)
        data.targets = b.tolist()  # what Avalanche's classification datasets read
        return as_classification_dataset(data)

    streams = {"train": [make(x[:train, p], y[:train]) for p in perms],
               "test": [make(x[train:train + test, p], y[train:train + test]) for p in perms]}
    return benchmark_from_datasets(**streams), [(x[train:train + test, p], y[train:train + test]) for p in perms]


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def run(plugins, optimizer=None, model=None):
    bench, tests = permuted_digits()
    model = model or mlp()
    strategy = Naive(model=model, optimizer=optimizer or torch.optim.SGD(model.parameters(), lr=0.1),
                     train_mb_size=32, train_epochs=3, plugins=plugins, evaluator=EvaluationPlugin())
    after_first = None
    for i, experience in enumerate(bench.train_stream):
        strategy.train(experience)
        if i == 0:
            after_first = accuracy(strategy.model, *tests[0])
    return strategy, after_first, [accuracy(strategy.model, x, y) for x, y in tests]


@pytest.mark.parametrize("structure", ["diagonal", "kfac"])
def test_ewc_plugin_on_kfac_keeps_the_first_experience(structure):
    ewc = EWCPlugin(lambda_=50.0, structure=structure, fisher_samples=300)
    kfac = KFACPlugin(lr=0.05, damping=1e-2, kl_clip=1e-2)
    strategy, first, accs = run([kfac, ewc])
    assert isinstance(strategy.optimizer, natgrad.KFAC) and kfac.builds == 1
    assert ewc.ewc is not None and len(ewc.ewc.tasks) == 2 and ewc.ewc.structure == structure
    assert ewc._attached is not None and ewc._attached[0] is strategy.optimizer
    assert first > 0.8 and accs[1] > 0.8, (first, accs)
    # against the same run without EWC: the first experience is remembered better
    _, _, plain = run([KFACPlugin(lr=0.05, damping=1e-2, kl_clip=1e-2)])
    assert accs[0] > plain[0] + 0.05, (accs, plain)


def test_kfac_plugin_rebuilds_the_optimizer_when_the_model_grows():
    kfac = KFACPlugin(lr=0.05, damping=1e-2)
    bench, _ = permuted_digits()
    model = mlp()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=64,
                     train_epochs=1, plugins=[kfac], evaluator=EvaluationPlugin())
    experiences = list(bench.train_stream)
    strategy.train(experiences[0])
    first = strategy.optimizer
    strategy.model.append(nn.Linear(10, 10))  # a new layer: a new parameter set
    strategy.train(experiences[1])
    assert kfac.builds == 2 and strategy.optimizer is not first
    assert "K-FAC linear" in strategy.optimizer.describe().splitlines()[-1]


def test_kfac_can_be_avalanches_optimizer_directly():
    model = mlp()
    strategy, first, _ = run([], optimizer=natgrad.KFAC(model, lr=0.05, damping=1e-2, kl_clip=1e-2), model=model)
    assert first > 0.8


def test_plugin_options_are_checked_when_made():
    with pytest.raises(ValueError, match="lambda_"):
        EWCPlugin(lambda_=-1.0)
    with pytest.raises(ValueError, match="attach"):
        EWCPlugin(attach="dense")
    with pytest.raises(ValueError, match="damping"):
        KFACPlugin(damping=-1.0)
