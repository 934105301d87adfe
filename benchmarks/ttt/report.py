"""The time-to-target report: the printed table, one PNG per workload (validation metric
against training CPU seconds: median over seeds, min-max band, target line) and a summary PNG
of every optimizer's time to target over AdamW's."""
from __future__ import annotations

import math
import os
from typing import Any

COLORS = {"SGD": "tab:blue", "AdamW": "tab:orange", "Muon": "tab:purple", "SOAP": "tab:red",
          "natgrad.KFAC": "tab:green", "natgrad.EKFAC": "tab:olive", "natgrad.EigenAdam": "tab:cyan",
          "natgrad.EigenAdam-shampoo": "tab:pink", "natgrad.KFAC-adaptive": "tab:gray", "kfac-pytorch": "tab:brown"}


def _num(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    return "not reached" if math.isinf(x) else format(x, spec)


def _hp(hp: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in hp.items())


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: one row per (workload, optimizer), unavailable peers included."""
    headers = ["workload", "optimizer", "best trial", "best val (median)", "CPU s to target",
               "[min-max]", "steps", "samples", "× AdamW", "[min-max]", "seeds", "CPU ms/step"]
    rows = []
    for name, w in results["workloads"].items():
        for o, s in w["scores"].items():
            hp = w["trials"][o][w["best_trial"][o]]["hp"]
            times = s["time_to_target_s"]
            finite = [t for t in times if math.isfinite(t)]
            spread = f"[{_num(min(times), '.1f')}–{_num(max(times), '.1f')}]" if finite else "-"
            ratio = "not reached" if s["ratio"] is None or math.isinf(s["ratio"]) else f"{s['ratio']:.2f}"
            rspread = ("-" if s["ratio_min"] is None or not finite else
                       f"[{_num(s['ratio_min'], '.2f')}–{_num(s['ratio_max'], '.2f')}]")
            rows.append([name, o, _hp(hp), f"{s['median_best']:.4g}", _num(s["median_time_s"], ".1f"), spread,
                         _num(s["median_steps"], ".0f"), _num(s["median_samples"], ".0f"), ratio, rspread,
                         f"{s['reached_seeds']}/{len(times)}", f"{step_ms(w, o):.1f}"])
        for o, why in results.get("unavailable", {}).items():
            rows.append([name, o, "not run (see below)", "-", "-", "-", "-", "-", "-", "-", "-", "-"])
    return headers, rows


def format_table(results: dict[str, Any]) -> str:
    """The table as fixed-width text, followed by each workload's target."""
    headers, rows = table_rows(results)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    left = {0, 1, 2}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append("")
    for name, w in results["workloads"].items():
        out.append(f"target ({name}) = median over AdamW's seeds of its best {w['metric']} = {w['target']:.4g}"
                   f"; budget {w['budget_s']:.3g} CPU s per run; winner: {winner(w)}")
    for o, why in results.get("unavailable", {}).items():
        out.append(f"not run: {o}: {why}")
    return "\n".join(out)


def markdown_table(results: dict[str, Any]) -> str:
    """The same rows as a Markdown table (for the README)."""
    headers, rows = table_rows(results)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def winner(w: dict[str, Any]) -> str:
    """The optimizer with the lowest median time to target (ties: lower median best value)."""
    ranked = sorted(w["scores"].items(), key=lambda kv: (kv[1]["median_time_s"], kv[1]["median_best"]))
    name, s = ranked[0]
    return f"{name} ({s['median_time_s']:.1f} s)" if math.isfinite(s["median_time_s"]) else "none reached"


def step_ms(w: dict[str, Any], o: str) -> float:
    """Median over the seeds of the training CPU milliseconds per step."""
    import statistics

    return statistics.median(1e3 * r["train_cpu_s"] / max(r["steps"], 1) for r in _seed_curves(w, o))


def _seed_curves(w: dict[str, Any], o: str) -> list[dict[str, Any]]:
    return [w["trials"][o][w["best_trial"][o]]] + w["seed_runs"][o]


def plot_workload(name: str, w: dict[str, Any], path: str) -> None:
    """Validation metric against training CPU seconds for every optimizer's best trial: median
    over seeds (runs interpolated on a common time grid), band from min to max, target line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = w["metric"]
    fig, ax = plt.subplots(figsize=(8, 5))
    values = []
    for o in w["scores"]:
        runs = _seed_curves(w, o)
        end = min(r["curve"][-1]["train_cpu_s"] for r in runs)
        if end <= 0:
            continue
        grid = np.linspace(0.0, end, 200)
        ys = []
        for r in runs:
            t = np.array([p["train_cpu_s"] for p in r["curve"]])
            v = np.array([p[metric] for p in r["curve"]], dtype=float)
            v[~np.isfinite(v)] = np.nan
            ys.append(np.interp(grid, t, v))
        ys = np.array(ys)
        med = np.median(ys, axis=0)
        s = w["scores"][o]
        label = f"{o}: " + ("not reached" if not s["reached"] else f"{s['median_time_s']:.1f} s")
        ax.plot(grid, med, color=COLORS.get(o), label=label, lw=1.5)
        ax.fill_between(grid, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=COLORS.get(o), alpha=0.18, lw=0)
        values.extend(v for v in med[len(med) // 10:] if np.isfinite(v))
    ax.axhline(w["target"], color="black", ls="--", lw=1, label=f"target (AdamW) {w['target']:.4g}")
    if values:
        lo, hi = min(values + [w["target"]]), max(values)
        pad = 0.05 * (hi - lo if hi > lo else abs(hi) + 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("training CPU seconds (process_time; evaluation excluded)")
    ax.set_ylabel(f"validation {metric} (median; band: min-max over 3 seeds)")
    ax.set_title(f"{name}: time to AdamW's target")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_summary(results: dict[str, Any], path: str) -> None:
    """Time to target / AdamW's per workload and optimizer (log scale; bar: min-max over
    seeds; 'not reached' marked at the right edge)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    optimizers = list(dict.fromkeys(o for w in results["workloads"].values() for o in w["scores"]))
    fig, ax = plt.subplots(figsize=(9.5, 1.4 + 1.1 * len(workloads)))
    finite = [s[k] for w in results["workloads"].values() for s in w["scores"].values()
              for k in ("ratio_min", "ratio_max", "ratio") if s[k] is not None and math.isfinite(s[k]) and s[k] > 0]
    hi = max(finite + [2.0]) * 1.6
    lo = min(finite + [0.5]) / 1.6
    step = 0.8 / max(len(optimizers), 1)
    for i, name in enumerate(workloads):
        for j, o in enumerate(optimizers):
            s = results["workloads"][name]["scores"].get(o)
            if s is None:
                continue
            y = i + (j - (len(optimizers) - 1) / 2) * step
            r = s["ratio"]
            if r is None or not math.isfinite(r):
                ax.plot([hi / 1.15], [y], marker="x", color=COLORS.get(o), ms=8)
                ax.text(hi / 1.25, y, "not reached", va="center", ha="right", fontsize=7, color=COLORS.get(o))
                continue
            rmin, rmax = s["ratio_min"], min(s["ratio_max"], hi / 1.15)
            ax.plot([rmin, rmax], [y, y], color=COLORS.get(o), lw=2, alpha=0.5)
            ax.plot([r], [y], "o", color=COLORS.get(o))
    for o in optimizers:  # one legend entry per optimizer, whatever it reached
        ax.plot([], [], "o", color=COLORS.get(o), label=o)
    ax.axvline(1.0, color="black", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(workloads)), workloads)
    ax.invert_yaxis()
    ax.set_xlabel("CPU time to AdamW's target / AdamW's (median over seeds; line: min-max; <1 is faster)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _floats(x: Any) -> Any:
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: _floats(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_floats(v) for v in x]
    return x


def load(path: str) -> dict[str, Any]:
    """A results JSON with its non-finite numbers (written as strings) back as floats."""
    import json

    with open(path) as f:
        return _floats(json.load(f))
