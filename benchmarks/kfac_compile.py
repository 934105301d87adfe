"""natgrad.KFAC with torch.compile: the training step of a small transformer with the model eager
and compiled (fullgraph=True), and with ``torch.compile(opt.step)``.

Usage::

    PYTHONPATH=python python benchmarks/kfac_compile.py [--steps N] [--threads T]
        [--backends inductor aot_eager]

Model: token embedding (vocab 256, width 128) + 2 post-LN nn.TransformerEncoderLayer (4 heads,
feed-forward 256, batch_first) + a linear head, batch 16 x 64 tokens, cross-entropy on the mean
of the sequence; natgrad.KFAC at its defaults (factor period 1, inverse period 10), lr 0.01.
A step is zero_grad, forward, loss, backward and ``opt.step()``. Each configuration trains a
fresh copy from the same weights on the same batches; the first ``WARMUP`` steps (compilation)
are timed apart (compilation); the configurations then step in turn on each batch, so load
from other processes on shared cores hits all alike. Reported: the median wall time of a timed
step and the mean CPU time of the process per step, whole and split into forward+backward and
``opt.step()`` (the robust numbers on a loaded machine; take
``steps`` a multiple of the inverse period so it holds its share of decompositions), and the
largest parameter difference from the eager run at the end. Prints a table; writes nothing.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import natgrad

WARMUP = 2


class Transformer(nn.Module):
    """Embedding, post-LN encoder layers and a linear head on the sequence mean."""

    def __init__(self, vocab=256, width=128, heads=4, layers=2, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0,
                                                               batch_first=True) for _ in range(layers))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        h = self.emb(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


class Config:
    """One configuration's model, optimizer and step function."""

    def __init__(self, name: str, base: nn.Module, model_backend: str | None, compile_step: bool) -> None:
        self.name = name
        self.model = copy.deepcopy(base)
        self.opt = natgrad.KFAC(self.model, lr=0.01)
        self.forward = (self.model if model_backend is None
                        else torch.compile(self.model, fullgraph=True, backend=model_backend))
        self.step_fn = torch.compile(self.opt.step) if compile_step else self.opt.step
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.cpu_opt: list[float] = []  # the optimizer's share

    def step(self, x, y) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.opt.zero_grad()
        F.cross_entropy(self.forward(x), y).backward()
        cpu_opt = time.process_time()
        self.step_fn()
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        self.cpu_opt.append(time.process_time() - cpu_opt)


def main() -> None:
    """Runs every configuration and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = Transformer()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (16, 64), generator=g), torch.randint(0, 10, (16,), generator=g))
               for _ in range(WARMUP + args.steps)]
    configs = [Config("eager model, eager step", base, None, False)]
    configs += [Config(f"compiled model ({b}, fullgraph), eager step", base, b, False) for b in args.backends]
    configs += [Config("eager model, torch.compile(opt.step)", base, None, True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in batches:  # interleaved: load from other processes hits every configuration alike
            for config in configs:
                config.step(x, y)
    breaks = sum(counters["graph_break"].values())
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} timed steps; "
          f"graphs compiled {counters['stats']['unique_graphs']}, graph breaks {breaks} "
          "(all of them torch.compile(opt.step)'s)")
    print(f"{'configuration':<46} {'warm-up s':>9} {'wall ms':>8} {'cpu ms':>8} {'fwd+bwd':>8} {'opt.step':>8} "
          f"{'cpu vs eager':>12} {'max |dθ|':>9}")
    eager = configs[0]
    for c in configs:
        wall = sorted(c.wall[WARMUP:])[args.steps // 2]
        cpu = sum(c.cpu[WARMUP:]) / args.steps
        opt = sum(c.cpu_opt[WARMUP:]) / args.steps
        diff = max(float((p - q).detach().abs().max()) for p, q in zip(c.model.parameters(), eager.model.parameters()))
        print(f"{c.name:<46} {sum(c.wall[:WARMUP]):>9.2f} {wall * 1e3:>8.1f} {cpu * 1e3:>8.1f} "
              f"{(cpu - opt) * 1e3:>8.1f} {opt * 1e3:>8.1f} "
              f"{cpu / (sum(eager.cpu[WARMUP:]) / args.steps):>12.2f} {diff:>9.1e}")


if __name__ == "__main__":
    main()
