"""The training comparison's report (benchmarks/train.py): the printed table and the PNG."""
from __future__ import annotations

import math
import os
from typing import Any


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else "inf" if math.isinf(x) else format(x, spec)


def format_table(summary: dict[str, Any]) -> str:
    """The results as a fixed-width text table, one row per (task, optimizer)."""
    headers = ["task", "optimizer", "picked (grid of 6)", "final loss (mean ± std)", "test loss",
               "steps→target", "time→target s", "total s", "step ms", "×SGD", "amort. ms", "×SGD"]
    rows = []
    for task, s in summary.items():
        for name, o in s["optimizers"].items():
            reached = o["steps_to_target"] is not None
            final = f"{_fmt(o['final_loss_mean'], '.4g')} ± {_fmt(o['final_loss_std'], '.2g')}"
            rows.append([task, name, o["picked"], final, _fmt(o["test_loss_mean"], ".4g"),
                         f"{o['steps_to_target']}/{o['steps']}" if reached else "not reached",
                         _fmt(o["time_to_target_s"], ".2f") if reached else "-",
                         _fmt(o["total_time_s_mean"], ".2f"), _fmt(o["median_step_s"] * 1e3, ".2f"),
                         _fmt(o["step_time_ratio_vs_sgd"], ".2f"),
                         _fmt(o["amortized_step_s"] * 1e3, ".2f"),
                         _fmt(o["amortized_ratio_vs_sgd"], ".2f")])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append("")
    for task, s in summary.items():
        r = s["kfac_time_ratio"]
        out.append(f"target ({task}) = {s['baseline']}'s mean final loss = {s['target_loss']:.4g}; K-FAC "
                   + ("never reached it" if r is None else f"reached it in {r:.2f}x {s['baseline']}'s wall-clock"))
    return "\n".join(out)


def plot(summary: dict[str, Any], path: str) -> None:
    """PNG: loss against steps (left) and wall-clock (right), one row per task; mean over
    seeds with a band from the lowest to the highest seed, the target as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"SGD": "tab:blue", "Adam": "tab:orange", "KFAC": "tab:green"}
    fig, axes = plt.subplots(len(summary), 2, figsize=(12, 4.2 * len(summary)), squeeze=False)
    for row, (task, s) in enumerate(summary.items()):
        for col, xkey in enumerate(("samples", "time_s_mean")):
            ax = axes[row][col]
            for name, o in s["optimizers"].items():
                c = o["curve"]
                xs = [st * o["best_config"]["batch"] for st in c["steps"]] if col == 0 else c[xkey]
                per_seed = [sd["losses"][:len(c["steps"])] for sd in o["seeds"]]
                lo, hi = (list(map(f, zip(*per_seed))) for f in (min, max))
                ax.plot(xs, c["loss_mean"], color=colors[name], label=f"{name} ({o['picked']})")
                ax.fill_between(xs, lo, hi, color=colors[name], alpha=0.2, linewidth=0)
            ax.axhline(s["target_loss"], color="gray", ls="--", lw=1, label=f"target ({s['baseline']} final)")
            ax.set_yscale("log")
            ax.set_xlabel("training samples" if col == 0 else "wall-clock training time (s)")
            ax.set_ylabel("training loss (mean; band: min-max over seeds)")
            ax.set_title(f"{task}: loss vs {'samples' if col == 0 else 'wall-clock'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
