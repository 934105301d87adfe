"""Natural-gradient benchmark: SGD, Adam, diagonal NGD and natgrad.NaturalGradient.

Usage: ``PYTHONPATH=python python benchmarks/natural_gradient.py [--quick] [--out-dir DIR]
[--seeds N] [--threads T]``. Writes ``natural_gradient.json`` and ``natural_gradient.png``
(default ``benchmarks/results``); ``--quick`` is a smoke test (< 1 minute).

Part 1 -- iterations and wall-clock to a target loss (problems and grids in :data:`FULL`):
``logreg`` (the goal problem), binary logistic regression (2-logit softmax) on synthetic
ill-conditioned, non-separable data (:func:`make_synthetic_logreg`), full batch, minimum L* from
float64 L-BFGS; ``logreg-digits``, 10-class softmax regression on scikit-learn's digits (1,438
standardised training images; linearly separable, so the loss has no minimiser), minibatches of
128; ``mlp``, a 64-32-10 tanh MLP on the same digits, minibatches of 128. Optimizers: SGD (no
momentum), Adam, DiagNGD (``NaturalGradient(structure="diagonal")``) and NGD
(``NaturalGradient``: empirical Fisher, Woodbury solve). Every grid point (lr; damping for the
NGD variants) runs with every seed (initial weights and minibatch order, shared by all
optimizers) for the same budget; the best point has the lowest mean final loss. The loss is the
cross entropy on the whole training set after every step, outside the timed region (batch,
zero_grad, backward, step). Target = Adam's mean final loss at its best lr; iterations and
seconds to it come from the seed-mean curves; if SGD misses it, SGD is rerun at its best lr for
``extend`` times the budget.

``fashion-mlp``, a 784-32-10 tanh MLP on 2,048 standardised Fashion-MNIST training images,
minibatches of 128. On ``mlp`` and ``fashion-mlp`` every optimizer gets the same tuning budget
(six grid points); the table also gives each optimizer's wall-clock time to SGD's final loss.

Part 2 -- step cost and memory at scale (:mod:`_ngd_scale`): ``nn.Linear(1000, 100)`` at n = 64
and a 784-1024-512-256-10 tanh MLP (1.46M parameters) at n = 128, a plain step against
``opt.backward`` + ``opt.step`` (implicit rows; explicit torch.func rows and the bare
``woodbury_solve`` op for the Linear layer) at 2 threads and at 1 (wall-clock, and the thread's
CPU time), and the peak memory of one step of each in a fresh subprocess.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import natgrad  # noqa: E402
from _harness import format_rows, machine_info, write_payload  # noqa: E402
from _ngd_scale import (build_model, format_scale_goals, memory_record, memory_table,  # noqa: E402
                        scale_goals, step_cost, step_cost_table)
from data import load_digits, load_fashion_mnist  # noqa: E402

DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OPTIMIZERS = ("SGD", "Adam", "DiagNGD", "NGD")
GOAL_ITERS = "NaturalGradient reaches the target in <= 1/5 of SGD's iterations on logreg"
GOAL_ITERS_RATIO = 0.2


def _grids(sgd: tuple[float, ...], adam: tuple[float, ...], diag: tuple[tuple[float, ...], ...],
           ngd: tuple[tuple[float, ...], ...]) -> dict[str, list[dict[str, float]]]:
    """Each optimizer's grid: learning rates (x dampings for the NGD variants)."""
    return {"SGD": [{"lr": lr} for lr in sgd], "Adam": [{"lr": lr} for lr in adam],
            **{name: [{"lr": lr, "damping": d} for lr in lrs for d in ds]
               for name, (lrs, ds) in (("DiagNGD", diag), ("NGD", ngd))}}


# Per problem: data, model widths, minibatch size (None: full batch), iteration budget, grids.
SYNTHETIC = {"num": 256, "dim": 50, "kappa": 1e3, "margin_std": 3.0, "seed": 123}
FULL: dict[str, Any] = {
    "problems": {
        "logreg": {"data": "synthetic", "widths": (50, 2), "batch": None, "iters": 300,
                   "grids": _grids((1.0, 3.0, 10.0, 30.0), (0.03, 0.1, 0.3, 1.0),
                                   ((0.03, 0.1, 0.3), (1e-4, 1e-3, 1e-2)),
                                   ((0.1, 0.3, 1.0), (1e-3, 1e-2, 1e-1)))},
        "logreg-digits": {"data": "digits", "widths": (64, 10), "batch": 128, "iters": 300,
                          "grids": _grids((3.0, 10.0, 30.0, 100.0), (0.1, 0.3, 1.0),
                                          ((0.1, 0.3, 1.0), (1e-2, 1e-1)),
                                          ((1.0, 3.0, 10.0), (1e-2, 1e-1)))},
        # equal tuning budgets: six grid points per optimizer
        "mlp": {"data": "digits", "widths": (64, 32, 10), "batch": 128, "iters": 300,
                "grids": _grids((0.3, 1.0, 3.0, 10.0, 30.0, 100.0), (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                                ((0.03, 0.1, 0.3), (1e-3, 1e-2)), ((0.3, 1.0, 3.0), (1e-3, 1e-2)))},
        "fashion-mlp": {"data": "fashion", "widths": (784, 32, 10), "batch": 128, "iters": 300, "train_size": 2048,
                        "grids": _grids((0.03, 0.1, 0.3, 1.0, 3.0, 10.0), (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
                                        ((0.01, 0.03, 0.1), (1e-3, 1e-2)), ((0.1, 0.3, 1.0), (1e-2, 1e-1)))},
    },
    "seeds": 3, "extend": 10,
    "step_cost": {"models": {"linear 1000-100": {"widths": (1000, 100), "n": 64, "explicit": True},
                             "mlp 784-1024-512-256-10": {"widths": (784, 1024, 512, 256, 10), "n": 128,
                                                         "explicit": False}},
                  "damping": 1e-3, "warmup": 3, "repeats": 20},
}
QUICK: dict[str, Any] = {
    "problems": {name: dict(cfg, iters=15, grids=_grids((1.0,), (0.03,), ((0.03,), (1e-2,)),
                                                        ((0.3,), (1e-2,))),
                            **({"train_size": 512} if cfg["data"] == "fashion" else {}))
                 for name, cfg in FULL["problems"].items()},
    "seeds": 1, "extend": 2,
    "step_cost": {"models": {"linear 1000-100": {"widths": (1000, 100), "n": 64, "explicit": True},
                             "mlp 784-1024-512-256-10": {"widths": (784, 1024, 512, 256, 10), "n": 128,
                                                         "explicit": False, "memory": False}},
                  "damping": 1e-3, "warmup": 1, "repeats": 2},
}


def make_optimizer(name: str, model: nn.Module, hp: dict[str, float]) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see :data:`OPTIMIZERS`) on ``model`` with hyperparameters ``hp``."""
    if name in ("SGD", "Adam"):
        return getattr(torch.optim, name)(model.parameters(), lr=hp["lr"])
    structure = {"DiagNGD": "diagonal", "NGD": "dense"}[name]
    return natgrad.NaturalGradient(model, lr=hp["lr"], damping=hp["damping"], structure=structure)


def load_standardized_digits() -> tuple[Tensor, Tensor]:
    """Digits training split (1,438 images) with each pixel standardised (constant pixels: 0)."""
    train, _ = load_digits()
    mean, std = train.x.mean(0), train.x.std(0)
    x = (train.x - mean) / torch.where(std > 1e-6, std, torch.ones_like(std))
    return x.contiguous(), train.y


def load_standardized_fashion(train_size: int) -> tuple[Tensor, Tensor]:
    """A fixed random subset (seed 0) of ``train_size`` Fashion-MNIST training images, each
    pixel standardised."""
    train, _ = load_fashion_mnist(train_size=train_size, test_size=1)
    mean, std = train.x.mean(0), train.x.std(0)
    x = (train.x - mean) / torch.where(std > 1e-6, std, torch.ones_like(std))
    return x.contiguous(), train.y


def make_synthetic_logreg(num: int, dim: int, kappa: float, margin_std: float,
                          seed: int) -> tuple[Tensor, Tensor]:
    """An ill-conditioned, non-separable binary logistic-regression data set.

    Inputs are Gaussian with covariance ``Q diag(s²) Qᵀ`` (``Q`` a random rotation, ``s²``
    log-spaced from 1 down to ``1/kappa``: not axis-aligned); the true weights ``Q (z / s)``
    (every eigen-direction matters equally) give margins of std ``margin_std``; labels are drawn
    from the logistic model, so the classes overlap and the loss has a finite minimiser.
    Returns x ``[num, dim]`` (float32) and y ``[num]`` (int64 in {0, 1}).
    """
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    s = torch.logspace(0.0, -0.5 * math.log10(kappa), dim, dtype=torch.float64)
    x = (torch.randn(num, dim, generator=gen, dtype=torch.float64) * s) @ q.T
    w = q @ (torch.randn(dim, generator=gen, dtype=torch.float64) / s)
    w = w * margin_std / (x @ w).std()
    y = (torch.rand(num, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ w)).long()
    return x.float().contiguous(), y


def optimum_loss(x: Tensor, y: Tensor, num_classes: int) -> float:
    """Minimum of the mean cross entropy of a softmax regression on ``(x, y)`` (float64 L-BFGS)."""
    x64 = x.double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=2000, tolerance_grad=1e-12,
                            tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        (loss := F.cross_entropy(x64 @ w + b, y)).backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    with torch.no_grad():
        return float(F.cross_entropy(x64 @ w + b, y))


def batch_order(num: int, batch: int | None, iters: int, seed: int) -> list[Tensor]:
    """``iters`` minibatch index tensors: reshuffled epochs from a generator seeded by ``seed``
    (``batch=None``: every step uses all ``num`` samples)."""
    if batch is None:
        return [torch.arange(num)] * iters
    gen = torch.Generator().manual_seed(10_000 + seed)
    out: list[Tensor] = []
    while len(out) < iters:
        perm = torch.randperm(num, generator=gen)
        out += [perm[i:i + batch] for i in range(0, num - batch + 1, batch)]
    return out[:iters]


def train_run(widths: tuple[int, ...], x: Tensor, y: Tensor, opt_name: str, hp: dict[str, float],
              seed: int, batch: int | None, iters: int, done: Callable[[], Any] | None = None
              ) -> tuple[list[float], list[float]]:
    """Trains a fresh model (initialised with ``seed``) for ``iters`` steps, then calls ``done()``.

    Returns the training-set loss before the first step and after each step (``inf`` after a
    divergence: a non-finite loss or a FloatingPointError from the optimizer) and the timed
    seconds of each step (0 after a divergence)."""
    torch.manual_seed(seed)
    model = build_model(widths)
    opt = make_optimizer(opt_name, model, hp)
    order = batch_order(x.shape[0], batch, iters, seed)

    def full_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    losses, step_s = [full_loss()], []
    for idx in order:
        start = time.perf_counter()
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        try:
            if isinstance(opt, natgrad.NaturalGradient):
                opt.backward(xb, yb)
            else:
                F.cross_entropy(model(xb), yb).backward()
            opt.step()
        except FloatingPointError:
            losses.append(math.inf)
        step_s.append(time.perf_counter() - start)
        if len(losses) == len(step_s):
            losses.append(full_loss())
        if not math.isfinite(losses[-1]):
            pad = iters + 1 - len(losses)
            losses, step_s = losses[:-1] + [math.inf] * (pad + 1), step_s + [0.0] * pad
            break
    if done is not None:
        done()
    return losses, step_s


def first_at_or_below(curve: list[float], target: float) -> int | None:
    """Index of the first value ``<= target`` (None if none)."""
    return next((i for i, v in enumerate(curve) if v <= target), None)


def run_problem(cfg: dict[str, Any], seeds: int, progress: Callable[[], None],
                extend: int = 10) -> dict[str, Any]:
    """Every optimizer at every grid point and seed on one problem; best points, target, curves.

    If SGD's best curve misses the target within the budget, SGD is rerun at its best learning
    rate for ``extend`` times the budget to count its iterations to the target (stored under
    ``optimizers.SGD.extended``)."""
    if cfg["data"] == "digits":  # separable by a softmax regression: no finite minimiser
        (x, y), optimum = load_standardized_digits(), None
    elif cfg["data"] == "fashion":
        (x, y), optimum = load_standardized_fashion(cfg["train_size"]), None
    else:
        x, y = make_synthetic_logreg(**SYNTHETIC)
        optimum = optimum_loss(x, y, cfg["widths"][-1])
    results: dict[str, Any] = {}
    for opt_name in OPTIMIZERS:
        grid_out = []
        for hp in cfg["grids"][opt_name]:
            runs = [train_run(cfg["widths"], x, y, opt_name, hp, seed, cfg["batch"], cfg["iters"],
                              progress) for seed in range(seeds)]
            finals = [losses[-1] for losses, _ in runs]
            grid_out.append({"hp": hp, "final_losses": finals, "mean_final": statistics.fmean(finals),
                             "diverged": [not math.isfinite(v) for v in finals], "runs": runs})
        best = min(grid_out, key=lambda g: g["mean_final"])
        runs = best["runs"]
        curve = [statistics.fmean(v) for v in zip(*(losses for losses, _ in runs))]
        cum = list(itertools.accumulate((statistics.fmean(s) for s in zip(*(t for _, t in runs))),
                                        initial=0.0))
        finals = best["final_losses"]
        results[opt_name] = {
            "best_hp": best["hp"], "curve": curve, "cum_time_s": cum,
            "final_mean": best["mean_final"],
            "final_std": statistics.pstdev(finals) if all(map(math.isfinite, finals)) else math.inf,
            "median_step_s": statistics.median(s for _, t in runs for s in t if s > 0),
            "grid": [{k: v for k, v in g.items() if k != "runs"} for g in grid_out],
        }
    target = results["Adam"]["final_mean"]
    for res in results.values():
        i = first_at_or_below(res["curve"], target * (1 + 1e-9))
        res["iters_to_target"] = i
        res["time_to_target_s"] = None if i is None else res["cum_time_s"][i]
        j = first_at_or_below(res["curve"], results["SGD"]["final_mean"] * (1 + 1e-9))
        res["time_to_sgd_final_s"] = None if j is None else res["cum_time_s"][j]
    sgd = results["SGD"]
    if sgd["iters_to_target"] is None and extend > 1:
        runs = [train_run(cfg["widths"], x, y, "SGD", sgd["best_hp"], seed, cfg["batch"],
                          extend * cfg["iters"], progress) for seed in range(seeds)]
        curve = [statistics.fmean(v) for v in zip(*(losses for losses, _ in runs))]
        sgd["extended"] = {"iters": extend * cfg["iters"], "final_mean": curve[-1],
                           "iters_to_target": first_at_or_below(curve, target * (1 + 1e-9))}
    data = dict(SYNTHETIC) if cfg["data"] == "synthetic" else {"name": cfg["data"]}
    widths = cfg["widths"]
    return {"config": {**cfg, "data": data, "num_samples": int(x.shape[0]), "seeds": seeds,
                       "num_params": sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))},
            "optimum_loss": optimum, "target_loss": target,
            "target_rule": "Adam's mean final loss at its best lr",
            "initial_loss": results["SGD"]["curve"][0], "optimizers": results}


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else ("inf" if not math.isfinite(v) else format(v, spec))


def _fmt_hp(hp: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in hp.items())


def _iters_cell(prob: dict[str, Any], res: dict[str, Any]) -> str:
    it, ext = res["iters_to_target"], res.get("extended")
    if it is not None or ext is None:
        return str(it) if it is not None else f">{prob['config']['iters']}"
    if ext["iters_to_target"] is None:
        return f">{ext['iters']} (rerun)"
    return f">{prob['config']['iters']} ({ext['iters_to_target']} in rerun)"


def convergence_table(problems: dict[str, Any]) -> str:
    """Fixed-width table of the best point of each optimizer on each problem."""
    headers = ["problem", "optimizer", "best hyperparameters", "final loss", "final - L*",
               "iters to target", "s to target", "s to SGD's final", "step ms", "step x SGD"]
    rows = []
    for pname, prob in problems.items():
        sgd_step = prob["optimizers"]["SGD"]["median_step_s"]
        for oname, res in prob["optimizers"].items():
            rows.append([pname, oname, _fmt_hp(res["best_hp"]),
                         f"{_fmt(res['final_mean'], '.4g')} ± {_fmt(res['final_std'], '.2g')}",
                         "-" if prob["optimum_loss"] is None else
                         _fmt(res["final_mean"] - prob["optimum_loss"], ".1e"),
                         _iters_cell(prob, res), _fmt(res["time_to_target_s"], ".3f"),
                         _fmt(res.get("time_to_sgd_final_s"), ".3f"),
                         _fmt(res["median_step_s"] * 1e3, ".2f"),
                         _fmt(res["median_step_s"] / sgd_step, ".1f")])
    return format_rows(headers, rows, left={0, 1, 2})


def describe_problems(problems: dict[str, Any]) -> str:
    """One line per problem: data, model size, batch, budget, target (and optimum)."""
    lines = []
    for pname, prob in problems.items():
        c = prob["config"]
        data = ("synthetic binary (2-logit softmax) logistic regression, {num} samples, {dim} "
                "features, covariance condition {kappa:g}".format(**c["data"])
                if c["data"].get("name") not in ("digits", "fashion") else
                f"{c['data']['name']}, {c['num_samples']} standardised training images, 10 classes")
        opt = "" if prob["optimum_loss"] is None else f", minimum L* = {prob['optimum_loss']:.6f}"
        lines.append(f"  {pname}: {data}; widths {c['widths']} ({c['num_params']} params); "
                     f"{'full batch' if c['batch'] is None else 'minibatch ' + str(c['batch'])}; "
                     f"{c['iters']} iterations; target {prob['target_loss']:.6f}{opt}")
    return "\n".join(lines)


def iteration_goal(prob: dict[str, Any]) -> dict[str, Any]:
    """NGD's iterations to the target over SGD's (from the rerun when SGD missed it within the
    budget; an upper bound when it missed it in the rerun too) and whether it is <= 1/5."""
    ngd, sgd = prob["optimizers"]["NGD"]["iters_to_target"], prob["optimizers"]["SGD"]
    sgd_iters, bound, note = sgd["iters_to_target"], None, ""
    if sgd_iters is None and sgd.get("extended"):
        sgd_iters = sgd["extended"]["iters_to_target"]
        note = f"SGD's count from a {sgd['extended']['iters']}-iteration rerun at its best lr"
    if sgd_iters is None:
        bound = sgd["extended"]["iters"] if sgd.get("extended") else prob["config"]["iters"]
        note = f"SGD did not reach the target in {bound} iterations: the ratio is an upper bound"
    if ngd is None:
        return {"ngd_iters": None, "sgd_iters": sgd_iters, "sgd_more_than": bound, "ratio": None,
                "upper_bound": False, "met": False, "note": "NaturalGradient did not reach the target"}
    den = max(sgd_iters if sgd_iters is not None else bound, 1)
    return {"ngd_iters": ngd, "sgd_iters": sgd_iters, "sgd_more_than": bound, "ratio": ngd / den,
            "upper_bound": bound is not None, "met": ngd <= GOAL_ITERS_RATIO * den, "note": note}


def evaluate_goals(problems: dict[str, Any], costs: list[dict[str, Any]],
                   memory: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals with the measured numbers and MET / NOT MET: iterations to the target (judged on
    ``logreg``), and step cost and memory at scale (see :func:`_ngd_scale.scale_goals`)."""
    iters = {name: iteration_goal(prob) for name, prob in problems.items()}
    return {"iterations": {"text": GOAL_ITERS, "judged_on": "logreg",
                           "met": iters["logreg"]["met"] if "logreg" in iters else None,
                           "per_problem": iters},
            "step_cost": scale_goals(costs, memory)}


def format_goals(goals: dict[str, Any]) -> str:
    """The goals as printed lines ([MET]/[NOT MET] where judged, (info) elsewhere)."""
    word = lambda ok: "MET" if ok else "NOT MET"  # noqa: E731
    lines = [f"Goal: {goals['iterations']['text']}"]
    for name, g in goals["iterations"]["per_problem"].items():
        tag = f"[{word(g['met'])}]" if name == goals["iterations"]["judged_on"] else "(info)"
        sgd = g["sgd_iters"] if g["sgd_iters"] is not None else f">{g.get('sgd_more_than')}"
        ratio = _fmt(g["ratio"], ".3f")
        lines.append(f"  {tag} {name}: NGD {g['ngd_iters']} vs SGD {sgd} iterations, ratio "
                     f"{'<= ' if g['upper_bound'] else ''}{ratio} (goal <= {GOAL_ITERS_RATIO})"
                     + (f"; {g['note']}" if g["note"] else ""))
    lines.append(format_scale_goals(goals["step_cost"]))
    return "\n".join(lines)


def plot(problems: dict[str, Any], path: str) -> None:
    """Loss (minus the minimum where known) against iterations and against wall-clock, one row
    per problem, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"SGD": "tab:blue", "Adam": "tab:orange", "DiagNGD": "tab:green", "NGD": "tab:red"}
    fig, axes = plt.subplots(len(problems), 2, figsize=(13, 4.3 * len(problems)), squeeze=False)
    for row, (pname, prob) in zip(axes, problems.items()):
        shift = prob["optimum_loss"] or 0.0

        def shown(v: float) -> float:
            return max(v - shift, 1e-9) if math.isfinite(v) else float("nan")

        for oname, res in prob["optimizers"].items():
            curve = [shown(v) for v in res["curve"]]
            label = f"{oname} ({_fmt_hp(res['best_hp'])})"
            row[0].plot(range(len(curve)), curve, color=colors[oname], label=label)
            row[1].plot(res["cum_time_s"][1:], curve[1:], color=colors[oname], label=label)
        c = prob["config"]
        batch = "full batch" if c["batch"] is None else f"batch {c['batch']}"
        for ax, xlabel in zip(row, ("iteration", "wall-clock s (timed steps, log scale)")):
            ax.axhline(shown(prob["target_loss"]), color="gray", ls="--", lw=1,
                       label="target (Adam's final loss)")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("training loss - L*" if prob["optimum_loss"] is not None
                          else "training loss")
            ax.set_title(f"{pname}: {c['num_params']} params, {batch}, mean of {c['seeds']} seeds",
                         fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        row[1].set_xscale("log")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Runs both parts, prints the tables and the goals, writes the JSON and the PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where the JSON and PNG go")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--problems", default=None, help="comma-separated subset of the problems")
    args = parser.parse_args(argv)
    cfg = copy.deepcopy(QUICK if args.quick else FULL)
    if args.problems:
        cfg["problems"] = {k: cfg["problems"][k] for k in args.problems.split(",")}
    seeds = args.seeds or cfg["seeds"]
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    wall = time.perf_counter()
    load_before = os.getloadavg()
    total = seeds * sum(1 + sum(map(len, p["grids"].values())) for p in cfg["problems"].values())
    problems = {}
    with tqdm(total=total, desc="training runs", leave=False, file=sys.stderr) as bar:
        for pname, pcfg in cfg["problems"].items():
            problems[pname] = run_problem(pcfg, seeds, lambda: bar.update(1), cfg["extend"])
    sc = cfg["step_cost"]
    costs = [rec for threads in sorted({args.threads, 2, 1}, reverse=True)
             for name, m in sc["models"].items()
             for rec in step_cost(name, m["widths"], m["n"], sc["damping"], sc["warmup"], sc["repeats"],
                                  threads, m["explicit"])]
    memory = [rec for name, m in sc["models"].items() if m.get("memory", True)
              if (rec := memory_record(name, m["widths"], m["n"], sc["damping"],
                                       ("plain", "implicit", "explicit") if m["explicit"] else
                                       ("plain", "implicit"))) is not None]
    goals = evaluate_goals(problems, costs, memory)
    wall = time.perf_counter() - wall
    load_after = os.getloadavg()

    print(f"\nConvergence ({seeds} seed(s); best grid point by mean final loss; target = Adam's "
          f"mean final loss at its best lr; SGD missing it is rerun for {cfg['extend']}x the "
          f"budget;\nfinal loss = mean ± std over seeds; step ms = median timed step):")
    print(describe_problems(problems) + "\n")
    print(convergence_table(problems))
    print(f"\nStep cost (medians of {sc['repeats']} interleaved rounds): plain = forward + "
          "loss.backward() + SGD.step(); NGD = opt.backward + opt.step with implicit rows (layer Gram "
          "matrices from hook data,\nthe default); explicit = the same with rows='explicit' (torch.func "
          "per-sample gradients); op = bare woodbury_solve on a random [n, p] matrix; clock cpu = "
          "the thread's CPU time\n(1 thread; immune to other processes).\n")
    print(step_cost_table(costs, format_rows))
    print("\nPeak step memory (a fresh subprocess per cell, MALLOC_MMAP_THRESHOLD_=65536, peak "
          "resident set of one step above the resident set before it; see benchmarks/_ngd_scale.py):\n")
    print(memory_table(memory, format_rows))
    print("\nGoals from the issue:")
    print(format_goals(goals))
    print(f"\nWall time {wall:.1f} s; torch threads {args.threads}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (other processes share the CPU).")

    json_path, png_path = (os.path.join(args.out_dir, f"natural_gradient.{e}") for e in ("json", "png"))
    write_payload(json_path, {"machine": machine_info(), "quick": args.quick, "wall_s": wall,
                              "load_average": {"before": list(load_before), "after": list(load_after)},
                              "problems": problems, "step_cost": costs, "memory": memory,
                              "goals": goals})
    plot(problems, png_path)  # write_payload created the directory
    print(f"Wrote {json_path}\nWrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
