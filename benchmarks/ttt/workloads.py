"""The time-to-target workloads: data (train and held-out validation splits), model, training
loss, batch sampler, validation metric and CPU-time budget.

Models and data are the other benchmarks' (no twins): the 784-512-512-10 MLP and the deep
autoencoder of ``benchmarks/train.py`` on Fashion-MNIST (``benchmarks/data.py``, Debian's
``dataset-fashion-mnist``), the 2-layer char transformer of ``benchmarks/char_lm.py`` on Debian's
``fortunes``; the CNN is a ResNet-20-style network defined here (3 stages of BatchNorm basic
blocks, one block per stage at 8/16/32 channels: a ResNet-8, so that a run is thousands of steps
on 2 CPU cores).

Validation splits are carved from the *training* images/text with a fixed seed (Fashion-MNIST's
official test set is never touched); every run of a workload sees the same validation set.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

from _harness import mlp  # noqa: E402
from data import Split, load_fashion_mnist  # noqa: E402

Batch = tuple[Tensor, Tensor]


@dataclass
class Workload:
    """One problem of the harness.

    Attributes:
        name: key of :data:`WORKLOADS`.
        metric: name of the validation metric (lower is better), e.g. ``"val_ce"``.
        budget_s: training CPU seconds of one run at ``--budget-scale 1``.
        batch_size: examples per step (sequences for the language model).
        make_model: ``make_model(seed)`` -> a fresh model, weights drawn from ``seed``.
        sample_batch: ``sample_batch(generator)`` -> a training batch ``(x, y)``.
        train_loss: ``train_loss(model, batch)`` -> the scalar loss that is back-propagated.
        evaluate: ``evaluate(model)`` -> metrics on the validation split; ``metric`` among them.
        io_modules: qualified names of the input and output layers (Muon leaves them to AdamW).
        kfac_kwargs: arguments natgrad.KFAC needs on this model (not tuned), e.g. the reduction.
        likelihood: the training loss as a natgrad likelihood ("categorical": cross-entropy of
            the logits; "bernoulli": binary cross-entropy of the logits), or None when natgrad has
            no closed-form output Fisher for it (optimizers that need one, natgrad.KFAC-adaptive,
            are then not run).
        nll_scale: the training loss over the likelihood's NLL summed per sample and reduced as
            natgrad.KFAC's ``loss_reduction`` says (1/784 for a per-pixel mean over 784 pixels).
        describe: the workload in words (stored in the JSON).
    """

    name: str
    metric: str
    budget_s: float
    batch_size: int
    make_model: Callable[[int], nn.Module]
    sample_batch: Callable[[torch.Generator], Batch]
    train_loss: Callable[[nn.Module, Batch], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    io_modules: tuple[str, ...]
    kfac_kwargs: dict[str, Any] = field(default_factory=dict)
    likelihood: str | None = "categorical"
    nll_scale: float = 1.0
    describe: str = ""


def _split_train_val(train: Split, val_size: int, train_size: int | None, seed: int = 0
                     ) -> tuple[Split, Split]:
    """A seeded held-out validation split of ``val_size`` training images; the rest (or a
    ``train_size`` subset of it) is the training split."""
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_size is not None:
        train_idx = train_idx[:train_size]
    return Split(train.x[train_idx].contiguous(), train.y[train_idx].contiguous()), \
        Split(train.x[val_idx].contiguous(), train.y[val_idx].contiguous())


def _sampler(split: Split, batch: int, transform: Callable[[Tensor], Tensor] | None = None
             ) -> Callable[[torch.Generator], Batch]:
    def sample(gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(split), (batch,), generator=gen)
        x = split.x[idx]
        return (transform(x) if transform else x), split.y[idx]
    return sample


@torch.no_grad()
def _chunked(model: nn.Module, x: Tensor, fn: Callable[[Tensor, Tensor], Tensor], chunk: int = 1000
             ) -> Tensor:
    """Sum over chunks of ``fn(model(x_chunk), chunk_index)`` (per-example values summed)."""
    was = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        total += fn(model(x[i:i + chunk]), torch.arange(i, min(i + chunk, x.shape[0]))).double()
    model.train(was)
    return total


def _classifier_eval(val: Split, transform: Callable[[Tensor], Tensor] | None = None
                     ) -> Callable[[nn.Module], dict[str, float]]:
    x = transform(val.x) if transform else val.x

    def evaluate(model: nn.Module) -> dict[str, float]:
        n = x.shape[0]
        ce = _chunked(model, x, lambda out, i: F.cross_entropy(out, val.y[i], reduction="sum"))
        acc = _chunked(model, x, lambda out, i: (out.argmax(1) == val.y[i]).sum())
        return {"val_ce": float(ce) / n, "val_acc": float(acc) / n}
    return evaluate


def _ce_loss(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


# ---- Fashion-MNIST workloads ------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _fashion(smoke: bool) -> tuple[Split, Split]:
    """Fashion-MNIST's training images split into training and validation (cached: three
    workloads share it; nobody writes to the tensors)."""
    full, _ = load_fashion_mnist(train_size=None, test_size=1, seed=0)
    if smoke:
        return _split_train_val(full, 256, 2048)
    return _split_train_val(full, 5000, None)


def fashion_mlp(smoke: bool = False) -> Workload:
    """784-512-512-10 ReLU MLP (benchmarks/train.py's), cross entropy; validation CE."""
    train, val = _fashion(smoke)
    widths = (784, 512, 512, 10)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return mlp(widths, nn.ReLU)

    return Workload("fashion_mlp", "val_ce", 30.0, 128, make, _sampler(train, 128), _ce_loss,
                    _classifier_eval(val), io_modules=("0", "4"),
                    describe=f"MLP {'-'.join(map(str, widths))} (ReLU) on Fashion-MNIST, {len(train)} "
                             f"training / {len(val)} validation images (held out from the training "
                             "set), batch 128; metric: validation cross entropy")


def autoencoder(smoke: bool = False) -> Workload:
    """benchmarks/train.py's deep autoencoder (784-256-128-32-128-256-784, tanh, logistic
    outputs). Trained on the per-pixel mean binary cross entropy (scale-free, so one learning
    rate range per optimizer serves every workload); the validation metric is train.py's loss:
    binary cross entropy summed over the 784 pixels, mean over images."""
    train, val = _fashion(smoke)
    widths = (784, 256, 128, 32, 128, 256, 784)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return mlp(widths, nn.Tanh)

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        return F.binary_cross_entropy_with_logits(model(batch[0]), batch[0])

    def evaluate(model: nn.Module) -> dict[str, float]:
        total = _chunked(model, val.x, lambda out, i: F.binary_cross_entropy_with_logits(
            out, val.x[i], reduction="sum"))
        return {"val_recon": float(total) / len(val)}

    return Workload("autoencoder", "val_recon", 30.0, 256, make, _sampler(train, 256), loss, evaluate,
                    io_modules=("0", str(2 * (len(widths) - 2))), likelihood="bernoulli",
                    nll_scale=1.0 / widths[-1],
                    describe=f"deep autoencoder {'-'.join(map(str, widths))} (tanh) on Fashion-MNIST, "
                             "batch 256; trained on per-pixel mean BCE; metric: validation "
                             "reconstruction BCE summed over pixels (train.py's loss)")


# ---- CNN --------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus a (1x1 conv-BN when the shape changes)
    shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(widths: tuple[int, ...] = (8, 16, 32), blocks: int = 1, classes: int = 10) -> nn.Sequential:
    """ResNet-(6·blocks+2) for 1-channel images: 3x3 stem conv-BN-ReLU, ``blocks`` basic blocks
    per width (stride 2 entering each later stage), global average pooling, linear head.
    ``blocks=3`` with widths (16, 32, 64) is ResNet-20."""
    layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c_in = widths[0]
    for stage, c in enumerate(widths):
        for b in range(blocks):
            layers.append(BasicBlock(c_in, c, 2 if (b == 0 and stage > 0) else 1))
            c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


def _to_image(x: Tensor) -> Tensor:
    """Flattened 28x28 images -> [N, 1, 14, 14] (2x2 average pooling: 4x fewer FLOPs)."""
    return F.avg_pool2d(x.view(-1, 1, 28, 28), 2)


def cnn(smoke: bool = False) -> Workload:
    """ResNet-8 (ResNet-20's structure, one block per stage, 8/16/32 channels) on 14x14
    Fashion-MNIST; validation cross entropy and accuracy."""
    train, val = _fashion(smoke)
    val = Split(val.x[:2000], val.y[:2000])
    train_img = Split(_to_image(train.x).contiguous(), train.y)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return resnet()

    model = resnet()
    last = str(len(model) - 1)
    return Workload("cnn", "val_ce", 45.0, 128, make, _sampler(train_img, 128), _ce_loss,
                    _classifier_eval(val, _to_image), io_modules=("0", last),
                    describe=f"ResNet-8 (basic blocks with BatchNorm, 8/16/32 channels) on 2x2-pooled "
                             f"14x14 Fashion-MNIST, {len(train)} training / {len(val)} validation "
                             "images, batch 128; metric: validation cross entropy (accuracy too)")


# ---- char LM ----------------------------------------------------------------------------------

def char_lm(smoke: bool = False) -> Workload:
    """benchmarks/char_lm.py's 2-layer char transformer on Debian's fortunes (first 90% train,
    last 10% validation); metric: validation nats per character on fixed windows."""
    import char_lm as clm

    data = clm.encode(clm.load_text())
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    if smoke:
        train = train[:200_000]
    val = clm.batches(held, 4 if smoke else 16, seed=12345)
    offsets = torch.arange(clm.CONTEXT + 1)

    def sample(gen: torch.Generator) -> Batch:
        start = torch.randint(0, len(train) - clm.CONTEXT - 1, (clm.BATCH,), generator=gen)
        window = train[start[:, None] + offsets]
        return window[:, :-1], window[:, 1:]

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return clm.CharGPT()

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        return clm.lm_loss(model, *batch)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        value = sum(float(clm.lm_loss(model, x, y)) for x, y in val) / len(val)
        model.train()
        return {"val_nats": value}

    return Workload("char_lm", "val_nats", 90.0, clm.BATCH, make, sample, loss, evaluate,
                    io_modules=("tok", "head"), kfac_kwargs={"loss_reduction": "token_mean"},
                    describe=f"char transformer (2 pre-norm layers, d=64, context {clm.CONTEXT}) on "
                             f"Debian's fortunes, {len(train):,} training / {len(held):,} validation "
                             f"characters, batch {clm.BATCH} windows; metric: validation nats/char on "
                             f"{len(val)} fixed batches")


WORKLOADS: dict[str, Callable[[bool], Workload]] = {
    "fashion_mlp": fashion_mlp, "autoencoder": autoencoder, "cnn": cnn, "char_lm": char_lm}


def build(name: str, smoke: bool = False) -> Workload:
    """The workload ``name`` (``smoke``: tiny data, for tests)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    return WORKLOADS[name](smoke)

