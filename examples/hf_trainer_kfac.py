"""natgrad.KFAC as the optimizer of Hugging Face's Trainer: a tiny GPT-2 trained from scratch on
synthetic token sequences (no downloads).

Run: ``PYTHONPATH=python python examples/hf_trainer_kfac.py`` (about a minute on a CPU).

The one line that matters: ``Trainer(..., optimizers=(natgrad.KFAC(model, ...), None))``. Trainer
puts the model in training mode, calls ``loss.backward()`` then ``optimizer.step()``, and builds its
learning-rate schedule over the optimizer's param groups; K-FAC's hooks see every forward and
backward. ``loss_reduction="token_mean"``: the causal-LM loss is a mean over every token, so each
token is one Fisher sample. GPT-2's ``Conv1D`` layers get Kronecker blocks
(:mod:`natgrad.integrations.transformers`), and its tied input/output embedding gets one block
(``KFAC.describe()`` says which).
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import natgrad


class ProgressionTokens(torch.utils.data.Dataset):
    """Sequences ``s, s+d, s+2d, ... (mod vocab)`` with a random start ``s`` and step ``d`` from a
    few values: each next token follows from the previous two.
    """

    def __init__(self, size: int, length: int = 32, vocab: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (size, 1), generator=g)
        step = torch.tensor([1, 2, 3, 5])[torch.randint(0, 4, (size, 1), generator=g)]
        self.tokens = (start + step * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_gpt2(vocab: int = 64, seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer, 32-wide GPT-2 with random weights."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


def train(steps: int = 100, output_dir: str | None = None, resume: bool = False, save_steps: int | None = None,
          batch_size: int = 16, seed: int = 0) -> tuple[list[float], float]:
    """Trains with natgrad.KFAC under Trainer; returns the logged training losses (one per step)
    and the final validation loss. ``save_steps``/``resume``: Trainer's checkpoints (K-FAC's
    factors are in ``optimizer.pt``).
    """
    model = tiny_gpt2(seed=seed)
    # --8<-- [start:trainer]
    optimizer = natgrad.KFAC(model, lr=0.05, damping=1e-2, kl_clip=1e-2, inverse_update_period=5,
                             loss_reduction="token_mean")
    args = TrainingArguments(output_dir=output_dir or tempfile.mkdtemp(), max_steps=steps,
                             per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
                             logging_steps=1, save_steps=save_steps or steps, save_strategy="steps",
                             report_to="none", seed=seed, data_seed=seed, use_cpu=True, lr_scheduler_type="constant",
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ProgressionTokens(2048, seed=seed),
                      eval_dataset=ProgressionTokens(256, seed=seed + 1), optimizers=(optimizer, None))
    # --8<-- [end:trainer]
    trainer.train(resume_from_checkpoint=resume or None)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, trainer.evaluate()["eval_loss"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    options = parser.parse_args()
    torch.set_num_threads(2)
    losses, validation = train(options.steps)
    print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} after {len(losses)} steps; "
          f"validation loss {validation:.3f} (uniform guess: {torch.log(torch.tensor(64.0)):.3f})")
