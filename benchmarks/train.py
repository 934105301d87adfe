"""Training comparison: SGD, Adam and natgrad.KFAC on three small CPU tasks, in wall-clock.

Usage::

    PYTHONPATH=python python benchmarks/train.py [--quick] [--out-dir DIR] [--seeds N]

Tasks (see :data:`FULL`):

* ``digits`` -- an MLP classifier (64-128-128-10, ReLU, cross entropy) on scikit-learn's 8x8
  digits (1,438 training images).
* ``fashion_mlp`` -- an MLP classifier 784-512-512-10 (ReLU, cross entropy) on a 10,000-image
  Fashion-MNIST subset.
* ``autoencoder`` -- a reduced deep autoencoder after Hinton & Salakhutdinov / Martens
  (784-256-128-32-128-256-784, tanh, logistic outputs, binary cross entropy summed over the
  pixels and averaged over the batch) on the same Fashion-MNIST subset.

Protocol: every run of a task sees the same number of training samples (steps x batch; a seed
fixes the initial weights and the minibatch order). Every optimizer has a grid of the same size
(6): SGD (momentum 0.9) and Adam 3 learning rates x 2 batch sizes; K-FAC (natgrad.KFAC's
defaults otherwise) 2 trust-region sizes (its step-size knob while the clip binds) x 3
configurations of inverse method and batch size (:func:`kfac_grid`). Stage 1 runs every grid
point on seed 0 and picks the one with the lowest final training loss; stage 2 adds seeds at
that point (default 2 seeds in all; the selection bias of seed 0 is the same for every
optimizer). Runs alternate between optimizers so that load from other processes hits all of them
alike. The training loss is measured on a fixed monitor set (all digits training images; 2,000
Fashion-MNIST training images) ``evals`` times per run, outside the timed region; a run whose
loss turns non-finite or exceeds 10x its initial value is stopped and counts as diverged (final
loss inf). Wall-clock time is the sum of the timed steps (batch fetch, forward, backward,
optimizer step).

The target of a task is the baseline's mean final loss: Adam's on the autoencoder (the issue's
goal: K-FAC within 0.5x Adam's wall-clock), the better of SGD and Adam on the classifiers. The
table gives each optimizer's picked grid point, final and held-out loss, steps and seconds to
the target on the seed-averaged curve, total time, median and amortized step time (median of
window means over K-FAC's inverse period, so its decompositions count) and their ratios to SGD's.
Writes ``train.json`` and ``train.png`` (loss against samples and against wall-clock) to
``--out-dir`` (default ``benchmarks/results``). ``--quick`` is a smoke test (tiny models, two
grid points each, one seed; < 1 minute).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Idle OpenMP workers sleep instead of spinning: with spinning, 2 threads on 2 cores shared with
# other processes slow some steps ~50x (measured here: 12 ms -> 590 ms per autoencoder step).
# Must be set before torch loads its OpenMP runtime; an explicit setting is respected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import natgrad  # noqa: E402
from _harness import machine_info, mlp, write_payload  # noqa: E402
from _train_report import _fmt, format_table, plot  # noqa: E402
from data import Split, load_digits, load_fashion_mnist  # noqa: E402

DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OPTIMIZERS = ("SGD", "Adam", "KFAC")
GOAL = "K-FAC reaches Adam's final autoencoder loss in <= 0.5x Adam's wall-clock time"
GOAL_TASK, GOAL_RATIO = "autoencoder", 0.5


def grid(lrs: tuple[float, ...], batches: tuple[int, ...], **fixed: Any) -> list[dict[str, Any]]:
    """Every (lr, batch) pair, with the ``fixed`` settings in each."""
    return [{"lr": lr, "batch": b, **fixed} for b in batches for lr in lrs]


# K-FAC's configurations (natgrad.KFAC's defaults otherwise: momentum 0.9, damping 1e-3,
# factor_decay 0.95, factor period 1, inverse period 10, exact refreshes: warm ones do not pay
# on CPU, see benchmarks/kfac_refresh.py). Its step-size dimension is the trust region κ
# (default 1e-3, and 1e-2) at lr 0.3: while the KL clip binds, the step length is set by κ
# whatever the lr. Three configurations: the eigen method at both batch sizes, and the inverse
# method (π-corrected damping; a Cholesky inverse per refresh instead of an eigh) at the large.
def kfac_grid(batches: tuple[int, int], lr: float = 0.3, kl_clips: tuple[float, ...] = (1e-3, 1e-2)
              ) -> list[dict[str, Any]]:
    """K-FAC's grid: kl_clip x {eigen at both batch sizes, inverse at the large}."""
    eigen = dict(inverse_method="eigen", factor_update_period=1, inverse_update_period=10)
    configs = [(batches[0], eigen), (batches[1], eigen), (batches[1], {**eigen, "inverse_method": "inverse"})]
    return [{"lr": lr, "kl_clip": kl, "batch": b, **c} for b, c in configs for kl in kl_clips]


# Per task: data, model, sample budget (steps x batch, the same for every run) and each
# optimizer's grid; ``baseline``: whose final loss is the target ("Adam", or "best" of SGD/Adam).
FULL: dict[str, dict[str, Any]] = {
    "digits": {
        "widths": (64, 128, 128, 10), "act": "relu", "loss": "ce", "samples": 600 * 128, "evals": 30,
        "grids": {"SGD": grid((0.03, 0.1, 0.3), (128, 512)), "Adam": grid((3e-3, 1e-2, 3e-2), (128, 512)),
                  "KFAC": kfac_grid((128, 512))},
        "baseline": "best",
    },
    "fashion_mlp": {
        "widths": (784, 512, 512, 10), "act": "relu", "loss": "ce", "samples": 400 * 256, "evals": 25,
        "train_size": 10000, "monitor_size": 2000, "test_size": 2000,
        "grids": {"SGD": grid((0.03, 0.1, 0.3), (256, 1024)), "Adam": grid((3e-4, 1e-3, 3e-3), (256, 1024)),
                  "KFAC": kfac_grid((256, 1024))},
        "baseline": "best",
    },
    "autoencoder": {
        "widths": (784, 256, 128, 32, 128, 256, 784), "act": "tanh", "loss": "bce", "samples": 400 * 256,
        "evals": 25, "train_size": 10000, "monitor_size": 2000, "test_size": 2000,
        "grids": {"SGD": grid((1e-3, 3e-3, 1e-2), (256, 1024)), "Adam": grid((1e-3, 3e-3, 1e-2), (256, 1024)),
                  "KFAC": kfac_grid((256, 1024))},
        "baseline": "Adam",
    },
}
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "digits": {"samples": 40 * 128, "evals": 5},
    "fashion_mlp": {"samples": 20 * 128, "evals": 4, "train_size": 1000, "monitor_size": 500, "test_size": 500,
                    "widths": (784, 64, 10)},
    "autoencoder": {"samples": 20 * 128, "evals": 4, "train_size": 1000, "monitor_size": 500,
                    "test_size": 500, "widths": (784, 64, 16, 64, 784)},
}


def quick_grid(grid_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """--quick: every optimizer's first two points, batches divided by 4 (at least 32)."""
    return [{**c, "batch": max(c["batch"] // 4, 32), **({"inverse_update_period": 5} if "inverse_method" in c else {})}
            for c in grid_[:2]]  # K-FAC: both kl_clips of the eigen method


@dataclass
class Task:
    """One benchmark problem: data, model factory, loss and budget.

    Attributes:
        name: a key of :data:`FULL`.
        cfg: the task's entry of :data:`FULL` (with ``--quick`` overrides applied).
        train: training split (minibatches are drawn from it).
        monitor: fixed subset of the training split on which the loss curve is measured.
        test: held-out split, evaluated once at the end of each run.
        loss_fn: ``loss_fn(model_output, inputs, labels)`` -> mean-over-batch scalar loss.
    """

    name: str
    cfg: dict[str, Any]
    train: Split
    monitor: Split
    test: Split
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor]

    def model(self, seed: int) -> nn.Module:
        """The task's MLP with weights drawn from ``seed`` (PyTorch's default init)."""
        torch.manual_seed(seed)
        return mlp(self.cfg["widths"], {"relu": nn.ReLU, "tanh": nn.Tanh}[self.cfg["act"]])


def _ce(out: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y)


def _bce_sum_pixels(out: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]


def build_tasks(quick: bool, names: list[str] | None = None) -> list[Task]:
    """Loads the data of the tasks ``names`` (default: all; ``quick``: small subsets, budgets
    and grids)."""
    tasks = []
    for name, base in FULL.items():
        if names is not None and name not in names:
            continue
        cfg = {**base, **(QUICK_OVERRIDES[name] if quick else {})}
        if quick:
            cfg["grids"] = {o: quick_grid(g) for o, g in cfg["grids"].items()}
        sizes = {len(g) for g in cfg["grids"].values()}
        assert len(sizes) == 1, f"{name}: every optimizer needs a grid of the same size, got {cfg['grids']}"
        loss = {"ce": _ce, "bce": _bce_sum_pixels}[cfg["loss"]]
        if name == "digits":
            train, test = load_digits(seed=0)
            tasks.append(Task(name, cfg, train, train, test, loss))
        else:
            train, test = load_fashion_mnist(cfg["train_size"], cfg["test_size"], seed=0)
            monitor = Split(train.x[:cfg["monitor_size"]], train.y[:cfg["monitor_size"]])
            tasks.append(Task(name, cfg, train, monitor, test, loss))
    return tasks


def make_optimizer(name: str, model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), Adam (default betas) or natgrad.KFAC (defaults, plus the config's
    settings other than lr and batch)."""
    lr = config["lr"]
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "Adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "KFAC":
        return natgrad.KFAC(model, **{k: v for k, v in config.items() if k != "batch"})
    raise ValueError(f"unknown optimizer {name!r}")


def describe_config(config: dict[str, Any]) -> str:
    """A grid point in words, e.g. ``lr 0.1, batch 1024, inverse (10,50) warm 4``."""
    text = f"lr {config['lr']:g}, batch {config['batch']}"
    if "kl_clip" in config:
        text += f", kl_clip {config['kl_clip']:g}"
    if "inverse_method" in config:
        text += (f", {config['inverse_method']} ({config['factor_update_period']},"
                 f"{config['inverse_update_period']})")
        if config.get("warm_refreshes"):
            text += f" warm {config['warm_refreshes']}"
    return text


@dataclass
class Run:
    """One training run (task, optimizer, grid point, seed).

    Attributes:
        steps, losses, times: the loss curve: monitor-set loss after ``steps[i]`` steps, reached
            after ``times[i]`` seconds of timed training.
        step_times: wall-clock seconds of every step.
        test_loss: held-out loss at the end (nan if the run diverged).
        diverged: the loss became non-finite or exceeded 10x its initial value (run stopped).
    """

    task: str
    optimizer: str
    config: dict[str, Any]
    index: int
    seed: int
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    test_loss: float = math.nan
    diverged: bool = False

    @property
    def final_loss(self) -> float:
        """Last monitor loss, or inf if the run diverged."""
        return math.inf if self.diverged else self.losses[-1]


def run_steps(task: Task, config: dict[str, Any]) -> tuple[int, int]:
    """(steps, eval_every) of a grid point: the task's sample budget over its batch size."""
    steps = max(task.cfg["samples"] // config["batch"], 1)
    return steps, max(steps // task.cfg["evals"], 1)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: Split, chunk: int = 2048) -> float:
    """Mean loss of ``model`` over ``split`` (in chunks, no graph, no K-FAC capture)."""
    total = 0.0
    for i in range(0, len(split), chunk):
        x, y = split.x[i:i + chunk], split.y[i:i + chunk]
        total += float(task.loss_fn(model(x), x, y)) * x.shape[0]
    return total / len(split)


def train_run(task: Task, opt_name: str, index: int, seed: int,
              on_step: Callable[[], None] | None = None) -> Run:
    """Trains a fresh model at grid point ``index`` for the task's sample budget and records
    its loss curve."""
    config = task.cfg["grids"][opt_name][index]
    model = task.model(seed)
    opt = make_optimizer(opt_name, model, config)
    gen = torch.Generator().manual_seed(10_000 + seed)
    run = Run(task.name, opt_name, config, index, seed)
    steps, eval_every = run_steps(task, config)
    elapsed = 0.0
    first = evaluate(model, task, task.monitor)
    run.steps.append(0), run.losses.append(first), run.times.append(0.0)
    n = len(task.train)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        idx = torch.randint(0, n, (config["batch"],), generator=gen)
        x, y = task.train.x[idx], task.train.y[idx]
        opt.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(x), x, y)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - start
        elapsed += dt
        run.step_times.append(dt)
        if on_step is not None:
            on_step()
        if step % eval_every == 0 or step == steps:
            value = evaluate(model, task, task.monitor)
            run.steps.append(step), run.losses.append(value), run.times.append(elapsed)
            if not math.isfinite(value) or value > 10 * first:
                run.diverged = True
                if on_step is not None:
                    for _ in range(steps - step):
                        on_step()
                break
    if not run.diverged:
        run.test_loss = evaluate(model, task, task.test)
    return run


def amortized_step_time(step_times: list[float], window: int) -> float:
    """Median over consecutive ``window``-step windows of the window's mean step time."""
    means = [sum(step_times[i:i + window]) / window
             for i in range(0, len(step_times) - window + 1, window)]
    return statistics.median(means) if means else statistics.mean(step_times)


def mean_curve(runs: list[Run]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean loss, std loss, mean time) over the runs' common evaluation points."""
    length = min(len(r.steps) for r in runs)
    steps = runs[0].steps[:length]
    mean = [statistics.fmean(r.losses[i] for r in runs) for i in range(length)]
    std = [statistics.pstdev([r.losses[i] for r in runs]) if len(runs) > 1 else 0.0
           for i in range(length)]
    times = [statistics.fmean(r.times[i] for r in runs) for i in range(length)]
    return steps, mean, std, times


def time_to_target(steps: list[int], losses: list[float], times: list[float], target: float
                   ) -> tuple[int | None, float | None]:
    """First evaluation point of a curve with loss <= ``target``: (steps, seconds) or Nones."""
    for s, loss, t in zip(steps, losses, times):
        if loss <= target * (1 + 1e-9):
            return s, t
    return None, None


def best_index(runs: list[Run], opt: str) -> int:
    """The grid point of ``opt``'s seed-0 runs with the lowest final loss (diverged: inf)."""
    tuning = [r for r in runs if r.optimizer == opt and r.seed == 0]
    return min(tuning, key=lambda r: r.final_loss).index


def summarize(task: Task, runs: list[Run]) -> dict[str, Any]:
    """Per optimizer: the seed-0 grid, the best grid point, and statistics over the seeds
    there (loss curve, final and test loss, time to the target, step times)."""
    out: dict[str, Any] = {"config": {k: v for k, v in task.cfg.items() if k != "grids"},
                           "grids": task.cfg["grids"], "optimizers": {}}
    for opt in OPTIMIZERS:
        grid_ = [{**r.config, "final_loss": r.final_loss, "diverged": r.diverged}
                 for r in runs if r.optimizer == opt and r.seed == 0]
        best = best_index(runs, opt)
        config = task.cfg["grids"][opt][best]
        rs = [r for r in runs if r.optimizer == opt and r.index == best]
        finals = [r.final_loss for r in rs]
        steps, mean, std, times = mean_curve(rs)
        pooled = [t for r in rs for t in r.step_times]
        window = config.get("inverse_update_period", 20)
        out["optimizers"][opt] = {
            "best_lr": config["lr"], "best_config": config, "picked": describe_config(config),
            "grid": grid_, "steps": run_steps(task, config)[0],
            "final_loss_mean": statistics.fmean(finals),
            "final_loss_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "test_loss_mean": statistics.fmean(r.test_loss for r in rs),
            "test_loss_std": statistics.pstdev([r.test_loss for r in rs]) if len(rs) > 1 else 0.0,
            "total_time_s_mean": statistics.fmean(sum(r.step_times) for r in rs),
            "median_step_s": statistics.median(pooled),
            "amortized_step_s": statistics.median(amortized_step_time(r.step_times, window) for r in rs),
            "curve": {"steps": steps, "loss_mean": mean, "loss_std": std, "time_s_mean": times},
            "seeds": [{"seed": r.seed, "steps": r.steps, "losses": r.losses, "times_s": r.times,
                       "test_loss": r.test_loss, "diverged": r.diverged} for r in rs],
        }
    opts = out["optimizers"]
    baseline = task.cfg["baseline"]
    if baseline == "best":
        baseline = min(("SGD", "Adam"), key=lambda o: opts[o]["final_loss_mean"])
    out["baseline"], out["target_loss"] = baseline, opts[baseline]["final_loss_mean"]
    sgd_med, sgd_amort = opts["SGD"]["median_step_s"], opts["SGD"]["amortized_step_s"]
    for o in opts.values():
        c = o["curve"]
        o["steps_to_target"], o["time_to_target_s"] = time_to_target(
            c["steps"], c["loss_mean"], c["time_s_mean"], out["target_loss"])
        o["step_time_ratio_vs_sgd"] = o["median_step_s"] / sgd_med
        o["amortized_ratio_vs_sgd"] = o["amortized_step_s"] / sgd_amort
    kfac, base = opts["KFAC"], opts[baseline]
    out["kfac_time_ratio"] = (None if kfac["time_to_target_s"] is None
                              else kfac["time_to_target_s"] / base["total_time_s_mean"])
    return out


def goal_status(summary: dict[str, Any]) -> dict[str, Any]:
    """Whether K-FAC reached Adam's final loss within GOAL_RATIO x Adam's wall-clock time."""
    if GOAL_TASK not in summary:
        return {"text": GOAL, "adam_time_s": None, "kfac_time_to_target_s": None, "ratio": None, "met": False}
    s = summary[GOAL_TASK]
    ratio = s["kfac_time_ratio"]
    return {"text": GOAL, "adam_time_s": s["optimizers"]["Adam"]["total_time_s_mean"],
            "kfac_time_to_target_s": s["optimizers"]["KFAC"]["time_to_target_s"], "ratio": ratio,
            "met": ratio is not None and ratio <= GOAL_RATIO}


def run_task(task: Task, seeds: int, bar: Any) -> list[Run]:
    """Stage 1: every grid point of every optimizer on seed 0. Stage 2: seeds 1..seeds-1 at
    each optimizer's best point. Optimizers alternate run by run, so that load from other
    processes falls on all of them alike."""
    runs: list[Run] = []

    def go(opt: str, index: int, seed: int) -> None:
        bar.set_postfix_str(f"{task.name} {opt} {describe_config(task.cfg['grids'][opt][index])} seed={seed}")
        runs.append(train_run(task, opt, index, seed, on_step=lambda: bar.update()))

    for i in range(len(task.cfg["grids"]["SGD"])):
        for opt in OPTIMIZERS:
            go(opt, i, 0)
    best = {opt: best_index(runs, opt) for opt in OPTIMIZERS}
    for seed in range(1, seeds):
        for opt in OPTIMIZERS:
            go(opt, best[opt], seed)
    return runs


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison, prints the table, writes train.json and train.png."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where JSON and PNG go")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (2; quick: 1)")
    parser.add_argument("--tasks", nargs="+", choices=list(FULL), default=None, help="a subset of the tasks")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    if seeds < 1:
        parser.error("--seeds must be >= 1")
    torch.set_num_threads(2)
    from tqdm import tqdm

    wall = time.perf_counter()
    tasks = build_tasks(args.quick, args.tasks)
    total = sum(run_steps(t, c)[0] for t in tasks for g in t.cfg["grids"].values() for c in g)
    total += (seeds - 1) * sum(max(run_steps(t, c)[0] for c in g) for t in tasks for g in t.cfg["grids"].values())
    summary: dict[str, Any] = {}
    with tqdm(total=total, unit="step", desc="training", dynamic_ncols=True) as bar:
        for task in tasks:
            summary[task.name] = summarize(task, run_task(task, seeds, bar))
    goal = goal_status(summary)
    wall = time.perf_counter() - wall

    print(f"\nTraining comparison ({'quick' if args.quick else 'full'}; every optimizer's best point of "
          f"its grid of the same size (lr x batch; K-FAC: kl_clip x method/batch), chosen on seed 0 "
          f"by final training loss at the same sample budget; {seeds} seed(s) there; 2 threads; total "
          f"wall time {wall:.0f} s)")
    print("final/test loss: mean over seeds (training monitor set / held-out); →target: first evaluation "
          "of the seed-averaged\ncurve at or below the target (the baseline's final loss), as steps/steps "
          "of the run; step ms: median step time;\namort.: median of window means (K-FAC: its inverse "
          "period; includes the decompositions); ×SGD: ratio to SGD's\n")
    print(format_table(summary))
    r = goal["ratio"]
    print(f"\nGoal: {GOAL}: {'MET' if goal['met'] else 'NOT MET'}\n  K-FAC "
          f"{'never reached it' if r is None else f'needed {r:.2f}x'} of Adam's {_fmt(goal['adam_time_s'], '.1f')} s")

    json_path = os.path.join(args.out_dir, "train.json")
    png_path = os.path.join(args.out_dir, "train.png")
    write_payload(json_path, {"machine": machine_info(), "quick": args.quick, "seeds": seeds,
                              "wall_time_s": wall, "goal": goal, "tasks": summary})
    plot(summary, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
