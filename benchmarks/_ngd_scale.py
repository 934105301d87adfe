"""Step cost and peak memory of natgrad.NaturalGradient against a plain gradient step (part 2 of
benchmarks/natural_gradient.py).

Time: interleaved rounds in one process (wall-clock, and with one thread the thread's CPU time,
which other processes cannot inflate) of a plain step (forward, ``loss.backward()``,
``SGD.step()``), ``opt.backward`` + ``opt.step`` with implicit rows (the default: layer Gram
matrices from hook data), the same with ``rows="explicit"`` (torch.func per-sample gradients,
the path before implicit rows; only where p·n is small enough) and the bare ``woodbury_solve``
op on a random ``[n, p]`` matrix.

Memory: each configuration runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``, so
glibc serves every tensor above 64 KiB with its own mmap and returns it to the OS when freed
(the resident set then tracks live tensors). After two warm-up steps the child resets the peak
resident set (``echo 5 > /proc/self/clear_refs``), runs one step, and reports ``VmHWM - VmRSS``
measured before the step: the step's peak memory above what the model, the batch and the
optimizer state already held. Gradients are set to None before each step, so the gradient
buffers count as the step's memory for both methods.
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import natgrad

MEMORY_KINDS = ("plain", "implicit", "explicit")


def build_model(widths: tuple[int, ...]) -> nn.Module:
    """``nn.Linear`` layers of the given widths with tanh between them (one layer: no tanh)."""
    layers: list[nn.Module] = [nn.Linear(widths[0], widths[1])]
    for a, b in zip(widths[1:-1], widths[2:]):
        layers += [nn.Tanh(), nn.Linear(a, b)]
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def _setup(widths: tuple[int, ...], n: int, kind: str, damping: float):
    """A model, a batch and a zero-argument step function for ``kind`` (see MEMORY_KINDS)."""
    torch.manual_seed(0)
    model = build_model(widths)
    x, y = torch.randn(n, widths[0]), torch.randint(0, widths[-1], (n,))
    if kind == "plain":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        opt = natgrad.NaturalGradient(model, lr=1e-3, damping=damping, rows=kind)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            opt.backward(x, y)
            opt.step()
    return model, step


def step_cost(name: str, widths: tuple[int, ...], n: int, damping: float, warmup: int,
              repeats: int, threads: int, explicit: bool) -> list[dict[str, Any]]:
    """Interleaved timings (``threads`` torch threads) of a plain step, NaturalGradient's
    backward and step (implicit rows; explicit rows too when ``explicit``) and the bare Woodbury
    op at batch size ``n``. Returns one record per clock (wall; cpu with one thread)."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    plain_model = build_model(widths)
    x, y = torch.randn(n, widths[0]), torch.randint(0, widths[-1], (n,))
    sgd = torch.optim.SGD(plain_model.parameters(), lr=1e-3)
    p = sum(q.numel() for q in plain_model.parameters())
    opts = {kind: natgrad.NaturalGradient(copy.deepcopy(plain_model), lr=1e-3, damping=damping, rows=kind)
            for kind in (("implicit", "explicit") if explicit else ("implicit",))}
    rows, rhs = torch.randn(n, p) / math.sqrt(p), torch.randn(p)

    def plain() -> None:
        sgd.zero_grad()
        F.cross_entropy(plain_model(x), y).backward()
        sgd.step()

    parts: dict[str, Callable[[], Any]] = {"plain": plain}
    for kind, opt in opts.items():
        suffix = "" if kind == "implicit" else "_explicit"
        parts[f"backward{suffix}"] = (lambda o: lambda: (o.zero_grad(), o.backward(x, y)))(opt)
        parts[f"step{suffix}"] = opt.step
    if explicit:
        parts["op"] = lambda: natgrad.ops.woodbury_solve(rows, rhs, damping).solution
    clocks = {"wall": time.perf_counter} | ({"cpu": time.thread_time} if threads == 1 else {})
    t: dict[str, dict[str, list[float]]] = {c: {k: [] for k in parts} for c in clocks}
    for r in range(warmup + repeats):
        for key, fn in parts.items():
            start = {c: clock() for c, clock in clocks.items()}
            fn()
            for c, clock in clocks.items():
                if r >= warmup:
                    t[c][key].append(clock() - start[c])
    torch.set_num_threads(saved_threads)
    records = []
    for clock, times in t.items():
        ms = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()}
        plain_ms = ms["plain_ms"]
        rec = {"name": name, "threads": threads, "clock": clock, "widths": list(widths),
               "num_params": p, "n": n, "damping": damping, "times_s": times, **ms,
               "ngd_total_ms": ms["backward_ms"] + ms["step_ms"],
               "ratio_total": (ms["backward_ms"] + ms["step_ms"]) / plain_ms,
               "ratio_step": ms["step_ms"] / plain_ms}
        if explicit:
            rec["explicit_total_ms"] = ms["backward_explicit_ms"] + ms["step_explicit_ms"]
            rec["ratio_explicit_total"] = rec["explicit_total_ms"] / plain_ms
            rec["ratio_op"] = ms["op_ms"] / plain_ms
        records.append(rec)
    return records


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def memory_child(widths: tuple[int, ...], n: int, kind: str, damping: float) -> dict[str, Any]:
    """In this (fresh) process: the peak resident memory of one step above what was resident
    before it (see the module docstring)."""
    torch.set_num_threads(1)
    model, step = _setup(widths, n, kind, damping)
    for _ in range(2):
        step()
    for p in model.parameters():
        p.grad = None
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    step()
    return {"kind": kind, "peak_bytes": _status_bytes("VmHWM") - before,
            "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def peak_memory(widths: tuple[int, ...], n: int, kind: str, damping: float) -> dict[str, Any] | None:
    """:func:`memory_child` in a subprocess (None where /proc is not available)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import _ngd_scale as s; "
            "print(json.dumps(s.memory_child(tuple(json.loads(sys.argv[2])), int(sys.argv[3]), "
            "sys.argv[4], float(sys.argv[5]))))")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", code, here, json.dumps(list(widths)), str(n), kind,
                           str(damping)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_record(name: str, widths: tuple[int, ...], n: int, damping: float,
                  kinds: tuple[str, ...]) -> dict[str, Any] | None:
    """Peak step memory of each kind and the ratios to the plain step's."""
    got = {kind: peak_memory(widths, n, kind, damping) for kind in kinds}
    if any(v is None for v in got.values()):
        return None
    plain = got["plain"]["peak_bytes"]
    rec = {"name": name, "widths": list(widths), "n": n, "params_bytes": got["plain"]["params_bytes"],
           **{f"{k}_peak_mb": v["peak_bytes"] / 2**20 for k, v in got.items()}}
    for k in kinds[1:]:
        rec[f"ratio_{k}"] = got[k]["peak_bytes"] / plain
    return rec


GOAL_STEP_RATIO = 3.0
GOAL_MEMORY_RATIO = 1.5
GOAL_STEP = (f"the whole NaturalGradient step (opt.backward + opt.step) <= {GOAL_STEP_RATIO:g}x a plain "
             "gradient step (1 thread) on Linear 1000->100 at n = 64 and on an MLP with >= 1e6 "
             f"parameters at n = 128; that MLP's peak step memory <= {GOAL_MEMORY_RATIO:g}x a plain step's")


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else ("inf" if not math.isfinite(v) else format(v, spec))


def step_cost_table(costs: list[dict[str, Any]], format_rows) -> str:
    """Fixed-width table of the step-cost measurements."""
    headers = ["model", "p", "n", "threads", "clock", "plain ms", "NGD ms", "backward ms", "step ms",
               "NGD/plain", "explicit NGD/plain", "op/plain"]
    rows = [[c["name"], str(c["num_params"]), str(c["n"]), str(c["threads"]), c["clock"],
             _fmt(c["plain_ms"], ".2f"), _fmt(c["ngd_total_ms"], ".2f"), _fmt(c["backward_ms"], ".2f"),
             _fmt(c["step_ms"], ".2f"), _fmt(c["ratio_total"], ".2f"),
             _fmt(c.get("ratio_explicit_total"), ".1f"), _fmt(c.get("ratio_op"), ".1f")] for c in costs]
    return format_rows(headers, rows, left={0, 4})


def memory_table(memory: list[dict[str, Any]], format_rows) -> str:
    """Fixed-width table of the peak-memory measurements."""
    headers = ["model", "n", "params MB", "plain peak MB", "NGD peak MB", "NGD/plain",
               "explicit peak MB", "explicit/plain"]
    rows = [[m["name"], str(m["n"]), _fmt(m["params_bytes"] / 2**20, ".1f"), _fmt(m["plain_peak_mb"], ".1f"),
             _fmt(m["implicit_peak_mb"], ".1f"), _fmt(m["ratio_implicit"], ".2f"),
             _fmt(m.get("explicit_peak_mb"), ".1f"), _fmt(m.get("ratio_explicit"), ".2f")] for m in memory]
    return format_rows(headers, rows, left={0})


def scale_goals(costs: list[dict[str, Any]], memory: list[dict[str, Any]]) -> dict[str, Any]:
    """The step-cost and memory goals, judged on the one-thread CPU-time records (the clock other
    processes on a shared machine cannot inflate) and on the peak-memory subprocesses."""
    steps = [{"model": c["name"], "threads": c["threads"], "clock": c["clock"],
              "judged": c["threads"] == 1 and c["clock"] == "cpu", "ratio": c["ratio_total"],
              "met": c["ratio_total"] <= GOAL_STEP_RATIO} for c in costs]
    mem = [{"model": m["name"], "ratio": m["ratio_implicit"], "met": m["ratio_implicit"] <= GOAL_MEMORY_RATIO,
            "judged": m["name"].startswith("mlp")} for m in memory]
    judged = [g for g in steps + mem if g["judged"]]
    return {"text": GOAL_STEP, "met": bool(judged) and all(g["met"] for g in judged),
            "steps": steps, "memory": mem}


def format_scale_goals(goals: dict[str, Any]) -> str:
    """The goals as printed lines ([MET]/[NOT MET] where judged, (info) elsewhere)."""
    def tag(g: dict[str, Any]) -> str:
        return f"[{'MET' if g['met'] else 'NOT MET'}]" if g["judged"] else "(info)"

    lines = [f"Goal: {goals['text']}"]
    for g in goals["steps"]:
        lines.append(f"  {tag(g)} {g['model']}, {g['threads']} thread(s), {g['clock']}: whole step / "
                     f"plain = {g['ratio']:.2f}x (goal <= {GOAL_STEP_RATIO:g})")
    for g in goals["memory"]:
        lines.append(f"  {tag(g)} {g['model']}: peak step memory / plain = {g['ratio']:.2f}x "
                     f"(goal <= {GOAL_MEMORY_RATIO:g})")
    return "\n".join(lines)
