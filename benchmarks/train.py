"""Training comparison: SGD, Adam and natgrad.KFAC on two small CPU tasks.

Usage::

    PYTHONPATH=python python benchmarks/train.py [--quick] [--out-dir DIR] [--seeds N]

Tasks (see :data:`FULL`):

* ``digits`` -- an MLP classifier (64-128-128-10, ReLU, cross entropy) on scikit-learn's 8x8
  digits (1,438 training images), minibatches of 128.
* ``autoencoder`` -- a reduced deep autoencoder after Hinton & Salakhutdinov / Martens
  (784-256-128-32-128-256-784, tanh, logistic outputs, binary cross entropy summed over the
  pixels and averaged over the batch) on a 10,000-image Fashion-MNIST subset, minibatches of 256.

Protocol: every run has the same fixed number of steps (600 digits, 400 autoencoder; a seed
fixes the initial weights and the minibatch order, shared by all optimizers). Stage 1 (tuning)
runs every learning rate of each optimizer's 3-value grid on seed 0; the best rate is the one
with the lowest final training loss. Stage 2 adds seeds 1 and 2 at that rate, and results are
the mean and std over the 3 seeds (seed 0's tuning run included; the selection bias this brings
is the same for every optimizer). Runs alternate between optimizers so that load from other
processes hits all of them alike. The training loss is measured on a fixed monitor set (all
digits training images; 2,000 autoencoder training images) every ``eval_every`` steps, outside
the timed region; a run whose loss turns non-finite or exceeds 10x its initial value is stopped
and counts as diverged (final loss inf). Wall-clock time is the sum of the timed steps (batch
fetch, forward, backward, optimizer step).

Grids: SGD (momentum 0.9) 0.03/0.1/0.3 on digits (1.0 diverges), 1e-3/3e-3/1e-2 on the
autoencoder (its loss is summed over 784 pixels); Adam 3e-3/1e-2/3e-2 and 1e-3/3e-3/1e-2;
K-FAC 0.03/0.1/0.3 on both. K-FAC's other settings (:data:`KFAC_SETTINGS`) were tuned once by
hand on seed 0: momentum 0.5 (0.9 made the digits loss oscillate and climb at every lr; 0 was
slower on the autoencoder); damping 1e-2 and kl_clip 1e-2 (with momentum 0.9 on digits, damping
1e-3 and kl_clip 0.1 diverged and no clip gave NaN); decompositions every 20 steps (the
autoencoder's curve was the same as with every 10 steps, at half the eigendecomposition cost);
empirical Fisher (the plain loop; the Monte-Carlo Fisher gave the same digits result at lr 0.3
and has no Bernoulli likelihood for the autoencoder's loss). While the KL clip binds, the step
is ``sqrt(kl_clip / <u, g>)`` long whatever the lr, so K-FAC's lr grid matters little.

Columns of the printed table: final training and held-out loss; steps and seconds to reach
the target (Adam's mean final loss at its best rate), read off the seed-averaged curve; median
step time and its ratio to SGD's; the amortized step time (median over windows of
``inverse_update_period`` steps of the window's mean, so K-FAC's periodic decompositions are
included while time stolen by other processes mostly is not) and its ratio to SGD's. Writes
``train.json`` and ``train.png`` (loss against steps and against wall-clock) to ``--out-dir``
(default ``benchmarks/results``).

``--quick`` is a smoke test (few steps, one seed, small subsets; < 1 minute).
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
from _harness import machine_info, write_payload  # noqa: E402
from data import Split, load_digits, load_fashion_mnist  # noqa: E402

DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OPTIMIZERS = ("SGD", "Adam", "KFAC")
GOAL = "K-FAC reaches Adam's final autoencoder loss in <= 0.5x Adam's wall-clock time"
GOAL_TASK, GOAL_RATIO = "autoencoder", 0.5

# K-FAC settings other than lr, tuned once by hand on seed 0 (see the module docstring).
KFAC_SETTINGS: dict[str, Any] = {"momentum": 0.5, "damping": 1e-2, "kl_clip": 1e-2,
                                 "factor_update_period": 1, "inverse_update_period": 20}
# Per task: data, model, step budget and the learning-rate grid of each optimizer.
FULL: dict[str, dict[str, Any]] = {
    "digits": {
        "widths": (64, 128, 128, 10), "act": "relu", "batch": 128, "steps": 600,
        "eval_every": 10,
        "lrs": {"SGD": (0.03, 0.1, 0.3), "Adam": (3e-3, 1e-2, 3e-2), "KFAC": (0.03, 0.1, 0.3)},
        "kfac": KFAC_SETTINGS,
    },
    "autoencoder": {
        "widths": (784, 256, 128, 32, 128, 256, 784), "act": "tanh", "batch": 256,
        "steps": 400, "eval_every": 20, "train_size": 10000, "monitor_size": 2000,
        "test_size": 2000,
        "lrs": {"SGD": (1e-3, 3e-3, 1e-2), "Adam": (1e-3, 3e-3, 1e-2), "KFAC": (0.03, 0.1, 0.3)},
        "kfac": KFAC_SETTINGS,
    },
}
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "digits": {"steps": 60, "eval_every": 5},
    "autoencoder": {"steps": 30, "eval_every": 5, "train_size": 1000, "monitor_size": 500,
                    "test_size": 500, "batch": 128},
}


@dataclass
class Task:
    """One benchmark problem: data, model factory, loss and budget.

    Attributes:
        name: ``"digits"`` or ``"autoencoder"``.
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
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}[self.cfg["act"]]
        widths = self.cfg["widths"]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(widths) - 2:
                layers.append(act())
        return nn.Sequential(*layers)


def _ce(out: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y)


def _bce_sum_pixels(out: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]


def build_tasks(quick: bool) -> list[Task]:
    """Loads the data of both tasks (``quick``: small subsets and budgets)."""
    tasks = []
    for name, base in FULL.items():
        cfg = {**base, **(QUICK_OVERRIDES[name] if quick else {})}
        if name == "digits":
            train, test = load_digits(seed=0)
            tasks.append(Task(name, cfg, train, train, test, _ce))
        else:
            train, test = load_fashion_mnist(cfg["train_size"], cfg["test_size"], seed=0)
            monitor = Split(train.x[:cfg["monitor_size"]], train.y[:cfg["monitor_size"]])
            tasks.append(Task(name, cfg, train, monitor, test, _bce_sum_pixels))
    return tasks


def make_optimizer(name: str, model: nn.Module, lr: float, kfac_cfg: dict[str, Any]
                   ) -> torch.optim.Optimizer:
    """SGD (momentum 0.9), Adam (default betas) or natgrad.KFAC (``kfac_cfg``: momentum etc.)."""
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "Adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "KFAC":
        return natgrad.KFAC(model, lr=lr, **kfac_cfg)
    raise ValueError(f"unknown optimizer {name!r}")


@dataclass
class Run:
    """One training run (task, optimizer, learning rate, seed).

    Attributes:
        steps, losses, times: the loss curve: monitor-set loss after ``steps[i]`` steps, reached
            after ``times[i]`` seconds of timed training.
        step_times: wall-clock seconds of every step.
        test_loss: held-out loss at the end (nan if the run diverged).
        diverged: the loss became non-finite or exceeded 10x its initial value (run stopped).
    """

    task: str
    optimizer: str
    lr: float
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


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: Split, chunk: int = 2048) -> float:
    """Mean loss of ``model`` over ``split`` (in chunks, no graph, no K-FAC capture)."""
    total = 0.0
    for i in range(0, len(split), chunk):
        x, y = split.x[i:i + chunk], split.y[i:i + chunk]
        total += float(task.loss_fn(model(x), x, y)) * x.shape[0]
    return total / len(split)


def train_run(task: Task, opt_name: str, lr: float, seed: int,
              on_step: Callable[[], None] | None = None) -> Run:
    """Trains a fresh model for ``task.cfg["steps"]`` steps and records its loss curve."""
    cfg = task.cfg
    model = task.model(seed)
    opt = make_optimizer(opt_name, model, lr, cfg["kfac"])
    gen = torch.Generator().manual_seed(10_000 + seed)
    run = Run(task.name, opt_name, lr, seed)
    mc = opt_name == "KFAC" and cfg["kfac"].get("fisher_type") == "mc"
    likelihood = cfg.get("likelihood", "categorical")
    elapsed = 0.0
    first = evaluate(model, task, task.monitor)
    run.steps.append(0), run.losses.append(first), run.times.append(0.0)
    n = len(task.train)
    for step in range(1, cfg["steps"] + 1):
        start = time.perf_counter()
        idx = torch.randint(0, n, (cfg["batch"],), generator=gen)
        x, y = task.train.x[idx], task.train.y[idx]
        opt.zero_grad(set_to_none=True)
        out = model(x)
        if mc:
            opt.sample_fisher(out, likelihood)
        loss = task.loss_fn(out, x, y)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - start
        elapsed += dt
        run.step_times.append(dt)
        if on_step is not None:
            on_step()
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            value = evaluate(model, task, task.monitor)
            run.steps.append(step), run.losses.append(value), run.times.append(elapsed)
            if not math.isfinite(value) or value > 10 * first:
                run.diverged = True
                if on_step is not None:
                    for _ in range(cfg["steps"] - step):
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


def best_lr(runs: list[Run], opt: str) -> float:
    """The learning rate of ``opt``'s seed-0 runs with the lowest final loss (diverged: inf)."""
    tuning = [r for r in runs if r.optimizer == opt and r.seed == 0]
    return min(tuning, key=lambda r: r.final_loss).lr


def summarize(task: Task, runs: list[Run], window: int) -> dict[str, Any]:
    """Per optimizer: the seed-0 grid, the best learning rate, and statistics over the seeds
    there (loss curve, final and test loss, time to the target, step times)."""
    out: dict[str, Any] = {"config": dict(task.cfg), "optimizers": {}}
    for opt in OPTIMIZERS:
        grid = [{"lr": r.lr, "final_loss": r.final_loss, "diverged": r.diverged}
                for r in runs if r.optimizer == opt and r.seed == 0]
        best = best_lr(runs, opt)
        rs = [r for r in runs if r.optimizer == opt and r.lr == best]
        finals = [r.final_loss for r in rs]
        steps, mean, std, times = mean_curve(rs)
        pooled = [t for r in rs for t in r.step_times]
        out["optimizers"][opt] = {
            "best_lr": best, "grid": grid,
            "final_loss_mean": statistics.fmean(finals),
            "final_loss_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "test_loss_mean": statistics.fmean(r.test_loss for r in rs),
            "test_loss_std": statistics.pstdev([r.test_loss for r in rs]) if len(rs) > 1 else 0.0,
            "total_time_s_mean": statistics.fmean(sum(r.step_times) for r in rs),
            "median_step_s": statistics.median(pooled),
            "amortized_step_s": statistics.median(amortized_step_time(r.step_times, window)
                                                  for r in rs),
            "curve": {"steps": steps, "loss_mean": mean, "loss_std": std, "time_s_mean": times},
            "seeds": [{"seed": r.seed, "steps": r.steps, "losses": r.losses, "times_s": r.times,
                       "test_loss": r.test_loss, "diverged": r.diverged} for r in rs],
        }
    opts = out["optimizers"]
    target = opts["Adam"]["final_loss_mean"]
    out["target_loss"] = target
    sgd_med, sgd_amort = opts["SGD"]["median_step_s"], opts["SGD"]["amortized_step_s"]
    for o in opts.values():
        c = o["curve"]
        o["steps_to_target"], o["time_to_target_s"] = time_to_target(
            c["steps"], c["loss_mean"], c["time_s_mean"], target)
        o["step_time_ratio_vs_sgd"] = o["median_step_s"] / sgd_med
        o["amortized_ratio_vs_sgd"] = o["amortized_step_s"] / sgd_amort
    return out


def goal_status(summary: dict[str, Any]) -> dict[str, Any]:
    """Whether K-FAC reached Adam's final loss within GOAL_RATIO x Adam's wall-clock time."""
    opts = summary[GOAL_TASK]["optimizers"]
    adam, kfac = opts["Adam"], opts["KFAC"]
    adam_time, kfac_time = adam["total_time_s_mean"], kfac["time_to_target_s"]
    ratio = None if kfac_time is None else kfac_time / adam_time
    estimate = None if kfac["steps_to_target"] is None else (
        kfac["steps_to_target"] * kfac["amortized_step_s"]
        / (summary[GOAL_TASK]["config"]["steps"] * adam["amortized_step_s"]))
    return {"text": GOAL, "adam_time_s": adam_time, "kfac_time_to_target_s": kfac_time,
            "ratio": ratio, "ratio_from_amortized_steps": estimate,
            "met": ratio is not None and ratio <= GOAL_RATIO}


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else "inf" if math.isinf(x) else format(x, spec)


def format_table(summary: dict[str, Any]) -> str:
    """The results as a fixed-width text table, one row per (task, optimizer)."""
    headers = ["task", "optimizer", "best lr", "final loss (mean ± std)", "test loss",
               "steps→target", "time→target s", "total s", "step ms", "×SGD", "amort. ms",
               "×SGD"]
    rows = []
    for task, s in summary.items():
        for name, o in s["optimizers"].items():
            reached = o["steps_to_target"] is not None
            final = f"{_fmt(o['final_loss_mean'], '.4g')} ± {_fmt(o['final_loss_std'], '.2g')}"
            rows.append([task, name, _fmt(o["best_lr"], "g"), final,
                         _fmt(o["test_loss_mean"], ".4g"),
                         str(o["steps_to_target"]) if reached else "not reached",
                         _fmt(o["time_to_target_s"], ".2f") if reached else "-",
                         _fmt(o["total_time_s_mean"], ".2f"), _fmt(o["median_step_s"] * 1e3, ".2f"),
                         _fmt(o["step_time_ratio_vs_sgd"], ".2f"),
                         _fmt(o["amortized_step_s"] * 1e3, ".2f"),
                         _fmt(o["amortized_ratio_vs_sgd"], ".2f")])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append("")
    for task, s in summary.items():
        out.append(f"target ({task}) = Adam's mean final loss = {s['target_loss']:.4g}")
    return "\n".join(out)


def plot(summary: dict[str, Any], path: str) -> None:
    """2x2 PNG: loss against steps (left) and wall-clock (right), one row per task; mean over
    seeds with a band from the lowest to the highest seed, the target as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"SGD": "tab:blue", "Adam": "tab:orange", "KFAC": "tab:green"}
    fig, axes = plt.subplots(len(summary), 2, figsize=(12, 4.2 * len(summary)), squeeze=False)
    for row, (task, s) in enumerate(summary.items()):
        for col, xkey in enumerate(("steps", "time_s_mean")):
            ax = axes[row][col]
            for name, o in s["optimizers"].items():
                c = o["curve"]
                per_seed = [sd["losses"][:len(c["steps"])] for sd in o["seeds"]]
                lo, hi = (list(map(f, zip(*per_seed))) for f in (min, max))
                ax.plot(c[xkey], c["loss_mean"], color=colors[name],
                        label=f"{name} (lr {o['best_lr']:g})")
                ax.fill_between(c[xkey], lo, hi, color=colors[name], alpha=0.2, linewidth=0)
            ax.axhline(s["target_loss"], color="gray", ls="--", lw=1, label="target (Adam final)")
            ax.set_yscale("log")
            ax.set_xlabel("step" if col == 0 else "wall-clock training time (s)")
            ax.set_ylabel("training loss (mean; band: min-max over seeds)")
            ax.set_title(f"{task}: loss vs {'steps' if col == 0 else 'wall-clock'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_task(task: Task, seeds: int, bar: Any) -> list[Run]:
    """Stage 1: every learning rate of every grid on seed 0. Stage 2: seeds 1..seeds-1 at each
    optimizer's best rate. Optimizers alternate run by run, so that load from other processes
    falls on all of them alike."""
    runs: list[Run] = []

    def go(opt: str, lr: float, seed: int) -> None:
        bar.set_postfix_str(f"{task.name} {opt} lr={lr:g} seed={seed}")
        runs.append(train_run(task, opt, lr, seed, on_step=lambda: bar.update()))

    for i in range(max(len(task.cfg["lrs"][o]) for o in OPTIMIZERS)):
        for opt in OPTIMIZERS:
            if i < len(task.cfg["lrs"][opt]):
                go(opt, task.cfg["lrs"][opt][i], 0)
    best = {opt: best_lr(runs, opt) for opt in OPTIMIZERS}
    for seed in range(1, seeds):
        for opt in OPTIMIZERS:
            go(opt, best[opt], seed)
    return runs


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison, prints the table, writes train.json and train.png."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where JSON and PNG go")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (3; quick: 1)")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        parser.error("--seeds must be >= 1")
    torch.set_num_threads(2)
    from tqdm import tqdm

    wall = time.perf_counter()
    tasks = build_tasks(args.quick)
    total = sum(t.cfg["steps"] * (len(t.cfg["lrs"][o]) + seeds - 1) for t in tasks
                for o in OPTIMIZERS)
    summary: dict[str, Any] = {}
    with tqdm(total=total, unit="step", desc="training", dynamic_ncols=True) as bar:
        for task in tasks:
            runs = run_task(task, seeds, bar)
            summary[task.name] = summarize(task, runs, task.cfg["kfac"]["inverse_update_period"])
    goal = goal_status(summary)
    wall = time.perf_counter() - wall

    window = KFAC_SETTINGS["inverse_update_period"]
    print(f"\nTraining comparison ({'quick' if args.quick else 'full'}; {seeds} seed(s) at the "
          f"best lr of each grid, chosen on seed 0; 2 threads; total wall time {wall:.0f} s)")
    print(f"final/test loss: mean over seeds (training monitor set / held-out); →target: first "
          f"evaluation of the\nseed-averaged curve at or below the target; step ms: median step "
          f"time; amort.: median of {window}-step\nwindow means (includes K-FAC's "
          f"decompositions); ×SGD: ratio to SGD's\n")
    print(format_table(summary))
    r, r_est = goal["ratio"], goal["ratio_from_amortized_steps"]
    print(f"\nGoal: {GOAL}: {'MET' if goal['met'] else 'NOT MET'}\n  K-FAC "
          f"{'never reached it' if r is None else f'needed {r:.2f}x'} of Adam's "
          f"{goal['adam_time_s']:.1f} s measured"
          + ("" if r_est is None else f"; {r_est:.2f}x from steps x amortized step times "
             f"(insensitive to other processes' load)"))

    json_path = os.path.join(args.out_dir, "train.json")
    png_path = os.path.join(args.out_dir, "train.png")
    write_payload(json_path, {"machine": machine_info(), "quick": args.quick, "seeds": seeds,
                              "wall_time_s": wall, "goal": goal, "tasks": summary})
    plot(summary, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
