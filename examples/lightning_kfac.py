"""natgrad.KFAC in Lightning: a LightningModule whose ``configure_optimizers`` returns it, trained on
scikit-learn's digits (no downloads), with a checkpoint to resume from.

Run: ``PYTHONPATH=python python examples/lightning_kfac.py`` (about 20 seconds on a CPU).

Lightning's automatic optimization calls ``optimizer.step(closure)`` with a closure that runs
``training_step`` and ``backward``; natgrad.KFAC evaluates it under its hooks, so the factors come
from that forward and backward. Its ``state_dict`` (factors, decompositions, momentum, step count)
goes into Lightning's checkpoints, and ``fit(ckpt_path=...)`` resumes exactly where the run stopped.
"""
from __future__ import annotations

import argparse
import tempfile

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import natgrad


class DigitsClassifier(L.LightningModule):
    """An MLP on 8x8 digits, optimized by natgrad.KFAC."""

    def __init__(self, lr: float = 0.05, damping: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        #: the training loss of every step
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    # --8<-- [start:configure]
    def configure_optimizers(self):
        return natgrad.KFAC(self, lr=self.hparams.lr, damping=self.hparams.damping, kl_clip=1e-2,
                            inverse_update_period=5)
    # --8<-- [end:configure]


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle that depends on the seed and the epoch alone (Lightning calls ``set_epoch``), so a
    run resumed from a checkpoint sees the same batches as the uninterrupted one.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


def digits_loaders(batch_size: int = 64, seed: int = 0):
    """Training (1500 digits, shuffled with ``seed``) and validation (297) DataLoaders."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train = torch.utils.data.TensorDataset(x[:1500], y[:1500])
    val = torch.utils.data.TensorDataset(x[1500:], y[1500:])
    return (torch.utils.data.DataLoader(train, batch_size, sampler=EpochShuffle(len(train), seed)),
            torch.utils.data.DataLoader(val, 256))


def fit(epochs: int, root: str, ckpt_path: str | None = None, seed: int = 0) -> tuple[DigitsClassifier, L.Trainer]:
    """Fits (or resumes from ``ckpt_path``) for ``epochs`` epochs in total, saving a checkpoint per
    epoch under ``root``.
    """
    L.seed_everything(seed, verbose=False)
    model = DigitsClassifier()
    train, val = digits_loaders(seed=seed)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=root, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoints],
                        deterministic=True)
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model, trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    options = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as root:
        model, trainer = fit(options.epochs, root)
        print(f"training loss {model.losses[0]:.3f} -> {model.losses[-1]:.3f} after {len(model.losses)} steps; "
              f"validation loss {trainer.callback_metrics['val_loss']:.3f}")
