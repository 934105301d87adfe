"""Tables, plots and goal checks of benchmarks/continual.py (kept apart so that the benchmark
script stays readable)."""
from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import natgrad
from _harness import assert_close, format_rows, time_fn

EWC_GOALS = ("permuted, SGD protocol: diagonal EWC >= L2 + 5 points, L2 >= no penalty + 5 points, "
             "with interior validation λ",
             "permuted: K-FAC optimizer + attached Kronecker EWC >= every other method + 2 points "
             "(SGD and Adam rows)",
             "K-FAC + attached EWC stable at the λ where SGD + diagonal EWC diverges",
             "Fisher estimation >= 10x faster than a per-sample loop")


def format_scenario(name: str, res: dict[str, Any]) -> str:
    """The scenario's table: chosen λ (and where it lies in the tuned grid), average accuracy,
    first-task accuracy over time, memory."""
    n = len(next(iter(res["methods"].values()))["first_task_acc"])
    shown = range(n) if n <= 5 else sorted({0, 1, n // 2, n - 1})
    headers = ["method", "λ", "λ in grid", "avg acc", "learned", "forgot", *[f"T1 after {t + 1}" for t in shown],
               "Fisher MB/task"]
    rows = []
    for m in res["methods"].values():
        mem = m["memory_per_task_bytes"]
        learned, forgot = plasticity(m["acc_matrix_mean"])
        rows.append([m["label"], f"{m['lambda']:g}", f"{m['best_lambda_position']} of {len(m['grid'])}",
                     "%.1f ± %.1f" % tuple(100 * v for v in m["avg_acc"]), f"{100 * learned:.1f}", f"{100 * forgot:.1f}",
                     *["%.1f" % (100 * m["first_task_acc"][t][0]) for t in shown],
                     f"{mem[0] / 2**20:.2f}" if mem else "-"])
    c = res["config"]
    head = (f"{name} ({c['optimizer']}): {n} tasks, {c['train_per_task']} train / {c['val_per_task']} val / "
            f"{c['test_per_task']} test images per task, {c['epochs']} epoch(s); λ chosen on validation avg acc "
            f"over seeds {tuple(c['grid_seeds'])}, test accuracy (%) mean ± std over seeds {tuple(c['seeds'])}")
    text = (head + "\n(learned: mean accuracy on each task right after training it; forgot: its mean drop by the "
                   "end)\n" + format_rows(headers, rows))
    st = res.get("stability")
    if st and st.get("sgd_ewc_diverges_at") is not None:
        runs = ", ".join(f"λ={lam}: {'DIVERGED' if r['diverged'] else 'stable'} (val {100 * r['val_avg']:.1f})"
                         for lam, r in st["kfac_opt"].items())
        limit = st.get("predicted_sgd_limit")
        text += (f"\nSGD + diagonal EWC diverges at λ={st['sgd_ewc_diverges_at']:g} (val "
                 f"{100 * st['sgd_ewc_val_avg']:.1f}; predicted limit 2(1+μ)/(lr·max F) = "
                 + (f"{limit:.3g}" if limit else "?") + f"); K-FAC + attached EWC: {runs}")
    return text


def plasticity(acc: list[list[float]]) -> tuple[float, float]:
    """``(learned, forgot)``: the mean accuracy on each task right after training it, and its
    mean drop by the end (over all but the last task): avg acc = learned − forgot·(n−1)/n."""
    n = len(acc)
    learned = statistics.fmean(acc[t][t] for t in range(n))
    forgot = statistics.fmean(acc[t][t] - acc[n - 1][t] for t in range(n - 1)) if n > 1 else 0.0
    return learned, forgot


def plot(res: dict[str, Any], path: str, title: str) -> None:
    """Accuracy of each task over time per method (seed means), plus average accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(res["methods"].values())
    n = len(methods[0]["acc_matrix_mean"])
    fig, axes = plt.subplots(3, 3, figsize=(15, 11), sharey=True)
    colors = plt.cm.viridis([i / max(n - 1, 1) * 0.9 for i in range(n)])
    xs = list(range(1, n + 1))
    for ax, m in zip(axes.flat, methods):
        for j in range(n):
            ax.plot(xs[j:], [m["acc_matrix_mean"][t][j] for t in range(j, n)], "o-", color=colors[j],
                    label=f"task {j + 1}")
        ax.set_title(f"{m['label']} (λ={m['lambda']:g})\navg {100 * m['avg_acc'][0]:.1f}%", fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_xticks(xs)
    ax = axes.flat[-1]
    for m in methods:
        ax.plot(xs, [statistics.fmean(m["acc_matrix_mean"][t][:t + 1]) for t in range(n)], "o-", label=m["label"])
    ax.set_title("average accuracy over tasks seen so far", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_xticks(xs)
    ax.legend(fontsize=7)
    axes.flat[0].legend(fontsize=7, loc="lower left")
    for ax in axes[-1]:
        ax.set_xlabel("tasks trained")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_lambda_curves(results: dict[str, Any], path: str) -> None:
    """Validation average accuracy against λ per method, one panel per scenario (the tuning
    curves; the chosen λ circled, a diverged run marked x)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        for key, m in res["methods"].items():
            if key == "none":
                ax.axhline(next(iter(m["val_avg_by_lambda"].values())), color="k", ls="--", label=m["label"])
                continue
            lams = [float(k) for k in m["val_avg_by_lambda"]]
            vals = list(m["val_avg_by_lambda"].values())
            line, = ax.plot(lams, vals, "o-", label=m["label"])
            ax.plot([m["lambda"]], [m["val_avg_by_lambda"][str(m["lambda"])]], "o", ms=12, mfc="none",
                    color=line.get_color())
            bad = [(lam, v) for lam, v in zip(lams, vals) if m["diverged_by_lambda"][str(lam)]]
            if bad:
                ax.plot(*zip(*bad), "x", ms=10, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("λ")
        ax.set_title(f"{name} ({res['config']['optimizer']})", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation avg accuracy after the last task")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def evaluate_goals(results: dict[str, Any], timing: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals with the measured numbers (accuracies in percentage points)."""
    goals = []
    perm = results.get("permuted", {}).get("methods", {})
    a = {k: 100 * v["avg_acc"][0] for k, v in perm.items()}
    if {"ewc", "l2", "none"} <= set(a):
        interior = all(perm[k]["best_lambda_position"] == "interior" for k in ("ewc", "l2"))
        goals.append({"goal": EWC_GOALS[0], "met": a["ewc"] >= a["l2"] + 5 and a["l2"] >= a["none"] + 5 and interior,
                      "measured": f"EWC {a['ewc']:.1f}, L2 {a['l2']:.1f}, none {a['none']:.1f}: EWC − L2 = "
                                  f"{a['ewc'] - a['l2']:+.1f} (need ≥ 5), L2 − none = {a['l2'] - a['none']:+.1f} "
                                  f"(need ≥ 5); best λ: EWC {perm['ewc']['best_lambda_position']}, "
                                  f"L2 {perm['l2']['best_lambda_position']}"})
    if "kfac_opt" in a:
        others = {f"{k} (sgd)": v for k, v in a.items() if k != "kfac_opt"}
        others.update({f"{k} (adam)": 100 * v["avg_acc"][0]
                       for k, v in results.get("permuted_adam", {}).get("methods", {}).items()})
        best = max(others, key=others.get)
        goals.append({"goal": EWC_GOALS[1], "met": a["kfac_opt"] >= others[best] + 2,
                      "measured": f"K-FAC + EWC {a['kfac_opt']:.1f} vs best other {best} {others[best]:.1f} "
                                  f"({a['kfac_opt'] - others[best]:+.1f})"})
        st = results["permuted"].get("stability", {})
        lam = st.get("sgd_ewc_diverges_at")
        stable = lam is not None and not st["kfac_opt"][str(lam)]["diverged"]
        goals.append({"goal": EWC_GOALS[2], "met": stable,
                      "measured": "SGD + EWC never diverged in its grid" if lam is None else
                      f"SGD + EWC diverges at λ={lam:g}; K-FAC + EWC there: "
                      + ("stable" if stable else "DIVERGED") + " (val %.1f)" % (100 * st["kfac_opt"][str(lam)]["val_avg"])})
    goals.append({"goal": EWC_GOALS[3], "met": timing["goal_met"],
                  "measured": f"x{timing['speedup']:.1f}" + (f" (WRONG RESULT: {timing['error']})" if timing["error"] else "")})
    return goals


# ---- Fisher estimation time -------------------------------------------------------------------------------

def fisher_timing(train, cfg: dict[str, Any], mlp) -> dict[str, Any]:
    """EWC.consolidate (diagonal, empirical) vs a per-sample loop on the same samples and MLP
    (``mlp``: the benchmark's model class)."""
    torch.manual_seed(0)
    m = cfg["timing_samples"]
    x, y = train.x[:m], train.y[:m]
    model = mlp(x.shape[1], tuple(cfg["hidden"]), 10).eval()
    names = [n for n, _ in model.named_parameters()]

    def natgrad_fn() -> list[Tensor]:
        ewc = natgrad.EWC(model)
        ewc.consolidate(x, y)
        return [ewc.tasks[0]["diag"][n] for n in names]

    def loop_fn() -> list[Tensor]:
        acc = [torch.zeros_like(p) for p in model.parameters()]
        for i in range(m):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            for a, p in zip(acc, model.parameters()):
                a += p.grad ** 2
        return [a / m for a in acc]

    reps = cfg["timing_repeats"]
    t_nat, out_nat = time_fn(natgrad_fn, reps, warmup=1)
    t_loop, out_loop = time_fn(loop_fn, reps, warmup=1 if reps > 1 else 0)
    error = None
    try:
        assert_close(out_nat, out_loop, rtol=1e-3, atol_rel=1e-4, what="diagonal Fisher")
    except AssertionError as e:
        error = str(e)
    nat, loop = statistics.median(t_nat), statistics.median(t_loop)
    return {"samples": m, "natgrad_s": t_nat, "loop_s": t_loop, "natgrad_median_s": nat,
            "loop_median_s": loop, "speedup": loop / nat, "goal_min_speedup": 10.0,
            "goal_met": loop / nat >= 10.0 and error is None, "error": error}


def max_curvature(reg: Any) -> float | None:
    """Largest eigenvalue of the penalty's Hessian divided by λ, after the last consolidation
    (diagonal EWC: the largest summed Fisher entry; Kronecker: Σ_t λmax(A_t)·λmax(G_t), an upper
    bound; L2: 1). SGD with momentum μ on the penalty alone diverges once
    lr·λ·this > 2(1 + μ)."""
    if hasattr(reg, "anchor"):  # anchored L2
        return 1.0 if reg.anchor else None
    tasks = getattr(reg, "tasks", [])
    if not tasks:
        return None
    diag: dict[str, Tensor] = {}
    kron: dict[tuple[str, ...], float] = {}
    for task in tasks:
        for n, f in task["diag"].items():
            diag[n] = diag[n] + f if n in diag else f
        for names, block in task["kron"].items():
            top = [float(torch.linalg.eigvalsh(block.state[k].double())[-1]) for k in ("A", "G")]
            kron[names] = kron.get(names, 0.0) + top[0] * top[1]
    return max([float(f.max()) for f in diag.values()] + list(kron.values()))
