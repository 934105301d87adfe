"""natgrad.KFAC against AdamW on small models of the libraries users train with: transformers'
GPT-2, Llama and BERT, timm's resnet18 and ViT.

Usage::

    PYTHONPATH=python python benchmarks/clients.py [--steps 50] [--threads 2] [--models gpt2,llama,...]
        [--out benchmarks/results/clients.json]

Per model, from the same initialisation and batches (seed 0): the parameters K-FAC leaves on the
plain gradient (``KFAC.describe()`` after the first step), the wall time of the first step and
the median and mean of the others for K-FAC and AdamW (forward, backward, step; K-FAC refreshes
its decompositions every 10 steps, so the mean is the amortised cost and the median a step
without refresh), and the validation loss after ``--steps`` steps.

Models and data (random weights, nothing downloaded):

* gpt2 / llama: 2 layers, width 64, vocabulary 64, sequences of 32 tokens ``s, s+d, s+2d, ...
  (mod 64)`` (each next token follows from the previous two), batch 16;
* bert: 2 layers, width 64, sequence classification of bags of tokens (4 classes, the class
  decides which quarter of the vocabulary is over-represented), 32 tokens, batch 16;
* resnet18 (full width, 11.2M parameters) and vit (vit_tiny_patch16_224 at 32x32, patch 4, 5.4M):
  scikit-learn's digits upsampled to 3x32x32, batch 32, 10 classes.

Optimizers (one setting each, not tuned per model): AdamW lr 1e-3 (transformers 3e-3), K-FAC lr
0.05, damping 1e-2, kl_clip 1e-2, inverse period 10, ``loss_reduction="token_mean"`` for the
language models. Writes JSON and prints a table. The committed results come from two runs,
niced on a shared 2-core machine (load ~10): ``results/clients.json`` (gpt2, llama, bert, vit)
and ``results/clients_resnet18.json`` (``--models resnet18 --out ...``). Under such load the
wall times are inflated and the ratios noisy (AdamW and K-FAC run one after the other).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import natgrad

HERE = os.path.dirname(os.path.abspath(__file__))

VOCAB = 64


def progression(n, g, length=32):
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.tensor([1, 2, 3, 5])[torch.randint(0, 4, (n, 1), generator=g)]
    return (start + step * torch.arange(length)) % VOCAB


def bags(n, g, length=32):
    label = torch.randint(0, 4, (n,), generator=g)
    tokens = torch.randint(1, VOCAB, (n, length), generator=g)
    favoured = torch.randint(0, VOCAB // 4, (n, length), generator=g) + label[:, None] * (VOCAB // 4)
    tokens = torch.where(torch.rand(n, length, generator=g) < 0.3, favoured.clamp(min=1), tokens)
    return tokens, label


def digits32():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5, torch.tensor(d.target)


def make(name):
    """(model, batches(step) -> (inputs, targets), validation set, loss(model, inputs, targets), is_lm)."""
    import timm
    import transformers as tf

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name in ("gpt2", "llama"):
        if name == "gpt2":
            model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2,
                                                     n_head=2, bos_token_id=0, eos_token_id=0))
        else:
            model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=2, num_attention_heads=2,
                                                       num_key_value_heads=1, max_position_embeddings=32,
                                                       bos_token_id=0, eos_token_id=0, pad_token_id=0))
        train = progression(4096, g)
        val = progression(256, g)

        def loss(m, x, _):
            return m(input_ids=x, labels=x).loss
        return model, lambda i: (train[i * 16 % 4096:][:16], None), (val, None), loss, True
    if name == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=32, num_labels=4, pad_token_id=0))
        x, y = bags(4096, g)
        xv, yv = bags(256, g)

        def loss(m, x, y):
            return m(input_ids=x, labels=y).loss
        return model, lambda i: (x[i * 16 % 4096:][:16], y[i * 16 % 4096:][:16]), (xv, yv), loss, False
    x, y = digits32()
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    if name == "resnet18":
        model = timm.create_model("resnet18", num_classes=10)
    else:
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)

    def loss(m, x, y):
        return F.cross_entropy(m(x), y)
    return model, lambda i: (x[i * 32 % 1500:][:32], y[i * 32 % 1500:][:32]), (x[1500:], y[1500:]), loss, False


def run(name, optimizer, steps):
    model, batch, (xv, yv), loss_fn, lm = make(name)
    model.train()
    if optimizer == "kfac":
        opt = natgrad.KFAC(model, lr=0.05, damping=1e-2, kl_clip=1e-2, inverse_update_period=10,
                           loss_reduction="token_mean" if lm else "mean")
    else:
        lr = 3e-3 if name in ("gpt2", "llama", "bert") else 1e-3
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    times, losses = [], []
    for i in range(steps):
        x, y = batch(i)
        start = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    out = {"first_step_s": times[0], "median_step_s": statistics.median(times[1:]),
           "mean_step_s": statistics.fmean(times[1:]), "train_loss_first": losses[0], "train_loss_last": losses[-1]}
    model.eval()
    with torch.no_grad():
        out["val_loss"] = float(sum(loss_fn(model, xv[j:j + 64], None if yv is None else yv[j:j + 64]).item()
                                    * len(xv[j:j + 64]) for j in range(0, len(xv), 64)) / len(xv))
    if optimizer == "kfac":
        rows = opt.describe().splitlines()[1:]
        plain = [r.split()[0] for r in rows if "plain gradient" in r]
        out["plain_gradient_params"] = plain
        out["parameters"] = len(rows)
        out["numel"] = sum(p.numel() for p in model.parameters())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="gpt2,llama,bert,vit,resnet18")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "clients.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"steps": args.steps, "threads": args.threads, "torch": torch.__version__, "models": {}}
    print(f"{'model':9s} {'plain':>5s} {'first K/A':>10s} {'median K/A':>10s} {'mean K/A':>9s} "
          f"{'val K-FAC':>9s} {'val AdamW':>9s}")
    for name in args.models.split(","):
        kfac, adamw = run(name, "kfac", args.steps), run(name, "adamw", args.steps)
        r = results["models"][name] = {
            "kfac": kfac, "adamw": adamw,
            "first_step_ratio": kfac["first_step_s"] / adamw["first_step_s"],
            "median_step_ratio": kfac["median_step_s"] / adamw["median_step_s"],
            "mean_step_ratio": kfac["mean_step_s"] / adamw["mean_step_s"]}
        print(f"{name:9s} {len(kfac['plain_gradient_params']):5d} {r['first_step_ratio']:10.1f} "
              f"{r['median_step_ratio']:10.2f} {r['mean_step_ratio']:9.2f} {kfac['val_loss']:9.3f} "
              f"{adamw['val_loss']:9.3f}", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
