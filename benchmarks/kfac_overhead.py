"""Per-step overhead of natgrad.KFAC versus SGD with momentum in a plain training loop.

Usage::

    PYTHONPATH=python python benchmarks/kfac_overhead.py [--quick] [--out PATH] [--threads N]

Models: an MLP (784-512-512-10, batch 256) and a small ResNet-style CNN (32x32x3 input,
16-32-64 channels, batch 128; see ``kfac_peers.build_cnn``). Optimizers: ``torch.optim.SGD``
(momentum 0.9) and natgrad.KFAC at (factor_update_period, inverse_update_period) = (1, 1),
(1, 10) and (10, 100).

A run is N consecutive full steps (zero_grad, forward, cross-entropy, backward, step) on a
fresh copy of the model and a fresh optimizer, so KFAC starts at step 0. N is at least 100
(MLP) or 20 (CNN), rounded up to a multiple of the configuration's inverse period, so a run
holds exactly its amortized share of factor updates and decompositions (the step-0
decomposition included): (10, 100) always runs 100 steps. Amortized step time = run time / N. Every
configuration is run ``repeats`` times, interleaved (SGD, KFAC(10,100), ... then again), so
that load from other processes on the shared cores hits all alike; the median is reported,
with the ratio to SGD's median. Peak memory (harness method) is that of one step at step 0
(for KFAC: factor update and first decomposition). Batches are pre-generated random data.

Goals: amortized step time at (10, 100) <= 1.25x SGD's and at (1, 10) <= 2x SGD's.
Writes ``benchmarks/results/kfac_overhead.json``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import natgrad  # noqa: E402
from _harness import Comparison, Goal, Measurement, format_rows, peak_memory, write_json  # noqa: E402
from kfac_peers import build_cnn, build_mlp  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kfac_overhead.json")
PERIODS: tuple[tuple[int, int], ...] = ((1, 1), (1, 10), (10, 100))
GOALS: dict[tuple[int, int], float] = {(10, 100): 1.25, (1, 10): 2.0}  # max KFAC / SGD time
# *_steps: minimum steps of a run (rounded up per configuration to a multiple of its inverse
# period, so (10, 100) always runs 100 steps); *_repeats: interleaved runs per configuration.
FULL: dict[str, Any] = {"mlp": (784, 512, 512, 10), "mlp_batch": 256, "mlp_steps": 100,
                        "mlp_repeats": 2, "cnn_channels": (16, 32, 64), "cnn_image": 32,
                        "cnn_batch": 128, "cnn_steps": 20, "cnn_repeats": 2, "classes": 10,
                        "batches": 4, "warmup_steps": 2}
QUICK: dict[str, Any] = {"mlp": (64, 64, 64, 10), "mlp_batch": 32, "mlp_steps": 20,
                         "mlp_repeats": 1, "cnn_channels": (4, 8, 8), "cnn_image": 8,
                         "cnn_batch": 8, "cnn_steps": 20, "cnn_repeats": 1, "classes": 10,
                         "batches": 2, "warmup_steps": 2}
LR = 0.01
MOMENTUM = 0.9


@dataclass
class Config:
    """One optimizer setting: ``periods`` None is SGD."""

    label: str
    periods: tuple[int, int] | None

    def steps(self, minimum: int) -> int:
        """Steps of a run: ``minimum`` rounded up to a multiple of the inverse period, so the
        run holds exactly its amortized share of decompositions (and of factor updates, whose
        period divides the inverse period here)."""
        period = 1 if self.periods is None else self.periods[1]
        return -(-minimum // period) * period

    def make(self, model: nn.Module) -> torch.optim.Optimizer:
        """A fresh optimizer for ``model``."""
        if self.periods is None:
            return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        f, i = self.periods
        return natgrad.KFAC(model, lr=LR, momentum=MOMENTUM, factor_update_period=f,
                            inverse_update_period=i)


CONFIGS = [Config("SGD (momentum 0.9)", None)] + [Config(f"KFAC ({f},{i})", (f, i)) for f, i in PERIODS]


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]],
                steps: int) -> None:
    """``steps`` full training steps cycling through ``batches``."""
    for k in range(steps):
        x, y = batches[k % len(batches)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def timed_run(model: nn.Module, cfg: Config, batches: list[tuple[Tensor, Tensor]], steps: int) -> float:
    """Seconds per step of one run on a fresh model copy and optimizer (setup not timed)."""
    m = copy.deepcopy(model)
    opt = cfg.make(m)
    start = time.perf_counter()
    train_steps(m, opt, batches, steps)
    elapsed = time.perf_counter() - start
    if isinstance(opt, natgrad.KFAC):
        opt.remove_hooks()
    return elapsed / steps


def one_step_peak(model: nn.Module, cfg: Config, batches: list[tuple[Tensor, Tensor]]) -> int:
    """Peak bytes allocated by one step at step 0 (fresh model copy and optimizer)."""
    m = copy.deepcopy(model)
    opt = cfg.make(m)
    return peak_memory(lambda: train_steps(m, opt, batches, 1))


@dataclass
class Result:
    """Amortized step times of one configuration on one model."""

    model: str
    config: Config
    measurement: Measurement
    steps: int


def run_model(label: str, model: nn.Module, batches: list[tuple[Tensor, Tensor]], min_steps: int,
              repeats: int, warmup_steps: int, log: Callable[[str], None] = print) -> list[Result]:
    """Interleaved repeats of every configuration on one model."""
    n_params = sum(p.numel() for p in model.parameters())
    log(f"\n{label}: batch {tuple(batches[0][0].shape)}, {n_params} parameters")
    for cfg in CONFIGS:  # warm-up: allocator, kernels, thread pools
        timed_run(model, cfg, batches, warmup_steps)
    times: dict[str, list[float]] = {c.label: [] for c in CONFIGS}
    for r in range(repeats):
        for cfg in CONFIGS:
            t = timed_run(model, cfg, batches, cfg.steps(min_steps))
            times[cfg.label].append(t)
            log(f"  repeat {r + 1}/{repeats} {cfg.label}: {cfg.steps(min_steps)} steps, "
                f"{t * 1e3:.2f} ms/step")
    return [Result(label, cfg, Measurement(times[cfg.label], one_step_peak(model, cfg, batches)),
                   cfg.steps(min_steps)) for cfg in CONFIGS]


def comparisons(results: list[Result]) -> list[Comparison]:
    """KFAC versus SGD per model as harness Comparisons (time_ratio = SGD / KFAC)."""
    out = []
    for r in results:
        if r.config.periods is None:
            continue
        sgd = next(s for s in results if s.model == r.model and s.config.periods is None)
        limit = GOALS.get(r.config.periods)
        goal = None if limit is None else Goal(
            f"amortized step time at {r.config.periods} <= {limit:g}x SGD's", min_time_ratio=1.0 / limit)
        out.append(Comparison(r.config.label, r.model,
                              {"factor_update_period": r.config.periods[0],
                               "inverse_update_period": r.config.periods[1], "steps": r.steps,
                               "kfac_over_sgd": r.measurement.median_s / sgd.measurement.median_s},
                              r.measurement, sgd.measurement, baseline_desc="torch.optim.SGD(momentum=0.9)",
                              goal=goal))
    return out


def print_report(results: list[Result], comps: list[Comparison]) -> None:
    """Table of amortized step times and ratios, then the goals with MET / NOT MET."""
    print("\nAmortized step time = run of N consecutive full steps (fwd+bwd+step) / N; median of "
          "interleaved runs.\nx SGD = KFAC / SGD (lower is better); spread = min-max of the runs.\n")
    headers = ["model", "optimizer", "(f, inv)", "steps", "ms/step", "spread ms", "x SGD",
               "step-0 peak MB", "goal"]
    rows = []
    for r in results:
        sgd = next(s for s in results if s.model == r.model and s.config.periods is None)
        c = next((c for c in comps if c.group == r.model and c.name == r.config.label), None)
        status = "" if c is None or c.goal is None else ("MET" if c.goal_met else "NOT MET")
        t = r.measurement.times_s
        rows.append([r.model, r.config.label, "-" if r.config.periods is None else str(r.config.periods),
                     str(r.steps), f"{r.measurement.median_s * 1e3:.2f}",
                     f"{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}",
                     f"{r.measurement.median_s / sgd.measurement.median_s:.2f}",
                     f"{r.measurement.peak_bytes / 2**20:.1f}", status])
    print(format_rows(headers, rows, left={0, 1, 2, 8}))
    print("\nGoals:")
    for c in comps:
        if c.goal is not None:
            print(f"  [{'MET' if c.goal_met else 'NOT MET'}] {c.group}: {c.goal.text}: "
                  f"measured {c.params['kfac_over_sgd']:.2f}x")


def make_batches(n: int, shape: tuple[int, ...], classes: int) -> list[tuple[Tensor, Tensor]]:
    """``n`` random (inputs, labels) batches."""
    return [(torch.randn(*shape), torch.randint(0, classes, (shape[0],))) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    """Runs both models, prints the report and writes the JSON; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 1 minute)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg())
    print(f"torch threads {args.threads}; load average (1/5/15 min) at start: "
          + " ".join(f"{v:.2f}" for v in load_start))
    warnings.filterwarnings("ignore", message="natgrad.KFAC")  # fallback-ladder notes, if any
    cfg = QUICK if args.quick else FULL
    torch.manual_seed(0)
    mlp = build_mlp(cfg["mlp"])
    cnn = build_cnn(cfg["cnn_channels"], cfg["cnn_image"], cfg["classes"])
    s = cfg["cnn_image"]
    results = run_model("mlp", mlp, make_batches(cfg["batches"], (cfg["mlp_batch"], cfg["mlp"][0]), cfg["classes"]),
                        cfg["mlp_steps"], cfg["mlp_repeats"], cfg["warmup_steps"])
    results += run_model("cnn", cnn, make_batches(cfg["batches"], (cfg["cnn_batch"], 3, s, s), cfg["classes"]),
                         cfg["cnn_steps"], cfg["cnn_repeats"], cfg["warmup_steps"])
    comps = comparisons(results)
    print_report(results, comps)
    write_json(args.out, comps, extra={
        "threads": args.threads, "loadavg_start": load_start, "benchmark": "kfac_overhead", "quick": args.quick, "config": cfg, "lr": LR, "momentum": MOMENTUM,
        "rows": [{"model": r.model, "optimizer": r.config.label, "periods": r.config.periods,
                  "steps": r.steps, "times_s_per_step": r.measurement.times_s,
                  "median_s_per_step": r.measurement.median_s, "step0_peak_bytes": r.measurement.peak_bytes}
                 for r in results]})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
