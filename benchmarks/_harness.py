"""Reusable helpers for natgrad benchmarks: timing, peak memory, comparisons, tables, JSON.

A benchmark builds :class:`Comparison` objects with :func:`compare` (natgrad callable versus the
plain PyTorch composition a user would otherwise write), then reports them with
:func:`print_table` and :func:`write_json`.

Timing is the median of ``repeats`` wall-clock runs (``time.perf_counter``) after ``warmup``
untimed runs. Peak memory is the peak of bytes allocated through torch's CPU allocator during one
call, measured with ``torch.profiler`` (``profile_memory=True``): the signed ``[memory]`` events
(allocations positive, frees negative) are summed in time order and the running maximum is
taken. Memory that existed before the call is not counted; tensors the call returns are.
:func:`verify_peak_memory` checks the method on known allocations.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

MB = 1024.0**2


@dataclass
class Measurement:
    """Timings and peak memory of one callable.

    Attributes:
        times_s: wall-clock seconds of each timed run.
        peak_bytes: peak bytes allocated by torch during one call (see module docstring).
    """

    times_s: list[float]
    peak_bytes: int

    @property
    def median_s(self) -> float:
        """Median of the timed runs, in seconds."""
        return statistics.median(self.times_s)


@dataclass
class Goal:
    """A target from the issue that a comparison must meet.

    Attributes:
        text: the goal in words, printed next to the measured ratios.
        min_time_ratio: time ratio (baseline / natgrad) must be >= this, if set.
        min_mem_ratio_exclusive: memory ratio (baseline / natgrad) must be > this, if set.
    """

    text: str
    min_time_ratio: float | None = None
    min_mem_ratio_exclusive: float | None = None


@dataclass
class Comparison:
    """natgrad versus a plain PyTorch composition on one case.

    Attributes:
        name: short case label (printed).
        group: family of the case (e.g. ``"factors"``), for grouping in the table.
        params: sizes and settings of the case (stored in the JSON).
        natgrad: measurement of the natgrad call.
        baseline: measurement of the composition.
        baseline_desc: the composition in words.
        goal: the issue's goal for this case, if any.
        error: why natgrad's result disagreed with the composition's (None when it agreed).
    """

    name: str
    group: str
    params: dict[str, Any]
    natgrad: Measurement
    baseline: Measurement
    baseline_desc: str = ""
    goal: Goal | None = None
    error: str | None = None

    @property
    def time_ratio(self) -> float:
        """Baseline median time / natgrad median time (> 1: natgrad faster)."""
        return _ratio(self.baseline.median_s, self.natgrad.median_s)

    @property
    def mem_ratio(self) -> float:
        """Baseline peak bytes / natgrad peak bytes (> 1: natgrad uses less memory)."""
        return _ratio(float(self.baseline.peak_bytes), float(self.natgrad.peak_bytes))

    @property
    def goal_met(self) -> bool | None:
        """Whether the goal is met; None when the case has no goal."""
        if self.goal is None:
            return None
        ok = self.error is None
        if self.goal.min_time_ratio is not None:
            ok &= self.time_ratio >= self.goal.min_time_ratio
        if self.goal.min_mem_ratio_exclusive is not None:
            ok &= self.mem_ratio > self.goal.min_mem_ratio_exclusive
        return ok


def mlp(widths: Sequence[int], act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """The benchmarks' plain MLP: Linear layers of the given widths with ``act`` between them
    (PyTorch's default init; the caller seeds)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return math.inf if num > 0 else 1.0


def time_fn(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[list[float], Any]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    Returns:
        (seconds of each timed call, result of the last call).
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        del result
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silences file descriptor 2 (kineto prints a line per profiler start/stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _peak_and_time(fn: Callable[[], Any]) -> tuple[int, float, Any]:
    """(peak bytes, wall seconds, result) of one profiled call of ``fn``."""
    gc.collect()
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
    # FunctionEvents fold allocations into their enclosing op; the raw kineto events keep every
    # allocation (+nbytes) and free (-nbytes) as its own "[memory]" event.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())  # stable: ties keep emission order
    current = peak = 0
    for e in events:
        if e.device_type() != DeviceType.CPU:
            continue
        current += e.nbytes()
        peak = max(peak, current)
    return peak, elapsed, result


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by torch (CPU) during one call of ``fn``, its result included."""
    return _peak_and_time(fn)[0]


def verify_peak_memory() -> None:
    """Checks :func:`peak_memory` on known allocations; raises AssertionError if it is off.

    ``torch.empty(10**7)`` (float32) must read ~40 MB; two live 40 MB buffers with a third
    allocated after one is freed must read ~80 MB.
    """

    def two_live() -> None:
        a = torch.empty(10**7)
        b = torch.empty(10**7)
        del a
        c = torch.empty(10**7)
        del b, c

    for fn, expected in ((lambda: torch.empty(10**7), 4e7), (two_live, 8e7)):
        got = peak_memory(fn)
        assert abs(got - expected) <= 0.01 * expected, (
            f"peak-memory method is broken: expected ~{expected / 1e6:.0f} MB, got {got / 1e6:.1f} MB"
        )


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[Measurement, Any]:
    """Times ``fn`` (median of ``repeats`` after ``warmup``) and measures its peak memory.

    With ``repeats == 1`` and ``warmup == 0`` (very slow cases) a single profiled call gives both
    the time and the peak; otherwise the peak comes from one extra profiled call (the last call).

    Returns:
        (measurement, result of the last call of ``fn``).
    """
    gc.collect()
    if repeats == 1 and warmup == 0:
        peak, elapsed, result = _peak_and_time(fn)
        return Measurement([elapsed], peak), result
    times, result = time_fn(fn, repeats, warmup)
    del result
    peak, _, result = _peak_and_time(fn)
    return Measurement(times, peak), result


def assert_close(actual: Any, expected: Any, rtol: float = 1e-3, atol_rel: float = 1e-4,
                 what: str = "") -> None:
    """``torch.testing.assert_close`` with an absolute tolerance scaled to ``expected``.

    atol = ``atol_rel`` * max|expected|, so entries near zero are compared at the scale of the
    result rather than at float32 eps. Sequences are compared element by element.
    """
    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected), f"{what}: {len(actual)} vs {len(expected)} outputs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, rtol, atol_rel, f"{what}[{i}]")
        return
    expected = torch.as_tensor(expected)
    actual = torch.as_tensor(actual).to(expected.dtype)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_rel * scale + 1e-30,
                               msg=lambda m: f"natgrad result differs from composition ({what}):\n{m}")


def compare(name: str, group: str, natgrad_fn: Callable[[], Any], baseline_fn: Callable[[], Any],
            *, params: dict[str, Any] | None = None, repeats: int = 5, warmup: int = 1,
            check: Callable[[Any, Any], None] | None = assert_close, baseline_desc: str = "",
            goal: Goal | None = None, log: Callable[[str], None] | None = print) -> Comparison:
    """Measures natgrad and the composition on one case, then checks their results agree.

    Both callables are called the same number of times (``warmup + repeats + 1``, or once when
    ``repeats == 1 and warmup == 0``), so in-place EMA updates that return their factor end in
    the same state on both sides. A failed check does not raise: it is stored in
    :attr:`Comparison.error` (the case then never meets its goal).

    Args:
        name, group, params, baseline_desc, goal: stored in the :class:`Comparison`.
        natgrad_fn, baseline_fn: zero-argument callables doing one full operation each.
        repeats, warmup: see :func:`measure` (shared by both sides).
        check: ``check(natgrad_result, composition_result)`` raises if they differ; None skips.
        log: progress printer (None for silence).
    """
    if log:
        log(f"  {group}/{name} ...")
    nat, nat_out = measure(natgrad_fn, repeats, warmup)
    base, base_out = measure(baseline_fn, repeats, warmup)
    error = None
    if check is not None:
        try:
            check(nat_out, base_out)
        except AssertionError as e:
            error = str(e)
    del nat_out, base_out
    cmp = Comparison(name, group, dict(params or {}), nat, base, baseline_desc, goal, error)
    if log:
        log(f"    natgrad {nat.median_s * 1e3:.2f} ms, composition {base.median_s * 1e3:.2f} ms, "
            f"time x{cmp.time_ratio:.2f}, memory x{cmp.mem_ratio:.2f}"
            + (f"\n    WRONG RESULT: {error}" if error else ""))
    return cmp


def _fmt_ratio(r: float) -> str:
    return "inf" if math.isinf(r) else f"{r:.2f}"


def _fmt_mb(nbytes: int) -> str:
    mb = nbytes / MB
    return "0" if nbytes == 0 else f"{mb:.3g}" if mb < 100 else f"{mb:.0f}"


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.1f}" if ms < 1e4 else f"{ms:.0f}"


def format_table(comparisons: Sequence[Comparison]) -> str:
    """The comparisons as a fixed-width text table (one row per case, goal status last)."""
    headers = ["group", "case", "natgrad ms", "compos. ms", "time x", "natgrad MB",
               "compos. MB", "mem x", "goal"]
    rows = []
    for c in comparisons:
        status = "" if c.goal is None else ("MET" if c.goal_met else "NOT MET")
        if c.error:
            status = "WRONG RESULT" + (f" ({status})" if status else "")
        rows.append([c.group, c.name, _fmt_ms(c.natgrad.median_s), _fmt_ms(c.baseline.median_s),
                     _fmt_ratio(c.time_ratio), _fmt_mb(c.natgrad.peak_bytes),
                     _fmt_mb(c.baseline.peak_bytes), _fmt_ratio(c.mem_ratio), status])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    left = {0, 1, 8}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_rows(headers: Sequence[str], rows: Sequence[Sequence[str]],
                left: set[int] | frozenset[int] = frozenset({0})) -> str:
    """A fixed-width text table of string cells; columns in ``left`` are left-aligned, the
    others right-aligned (for benchmarks whose columns differ from :func:`format_table`)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_goals(comparisons: Sequence[Comparison]) -> str:
    """The issue's goals, each followed by its cases' measured ratios and MET / NOT MET."""
    by_goal: dict[str, list[Comparison]] = {}
    for c in comparisons:
        if c.goal is not None:
            by_goal.setdefault(c.goal.text, []).append(c)
    lines = []
    for text, cases in by_goal.items():
        met = sum(bool(c.goal_met) for c in cases)
        lines.append(f"Goal: {text}  ({met}/{len(cases)} cases met)")
        for c in cases:
            status = "MET" if c.goal_met else "NOT MET"
            if c.error:
                status += ", WRONG RESULT"
            lines.append(f"  [{status}] {c.group}/{c.name}: time x{_fmt_ratio(c.time_ratio)}, "
                         f"mem x{_fmt_ratio(c.mem_ratio)}")
    return "\n".join(lines)


def print_table(comparisons: Sequence[Comparison], title: str = "") -> None:
    """Prints :func:`format_table` and :func:`format_goals` with an explanatory legend."""
    if title:
        print(f"\n{title}")
    print("time x = composition time / natgrad time (>1: natgrad faster); mem x = composition "
          "peak / natgrad peak\n(>1: natgrad uses less memory; inf: natgrad allocated nothing). "
          "ms = median wall time; MB = peak torch-allocated MiB during one call.\n")
    print(format_table(comparisons))
    goals = format_goals(comparisons)
    if goals:
        print("\nGoals from the issue:")
        print(goals)


def machine_info() -> dict[str, Any]:
    """Machine, Python, torch and threading facts to store next to the numbers."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # 1/5/15-minute load averages when the JSON is written: other processes on shared cores
        # inflate and scatter timings (with 2 threads, each parallel region waits for a core)
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def comparison_record(c: Comparison) -> dict[str, Any]:
    """A JSON-ready dict of one comparison with raw times, peaks, ratios and goal."""
    def side(m: Measurement) -> dict[str, Any]:
        return {"times_s": m.times_s, "median_s": m.median_s, "peak_bytes": m.peak_bytes}

    return {
        "group": c.group, "name": c.name, "params": c.params,
        "baseline_desc": c.baseline_desc,
        "natgrad": side(c.natgrad), "composition": side(c.baseline),
        "time_ratio": c.time_ratio, "mem_ratio": c.mem_ratio, "error": c.error,
        "goal": None if c.goal is None else {
            "text": c.goal.text, "min_time_ratio": c.goal.min_time_ratio,
            "min_mem_ratio_exclusive": c.goal.min_mem_ratio_exclusive, "met": c.goal_met},
    }


def write_json(path: str, comparisons: Sequence[Comparison], extra: dict[str, Any] | None = None
               ) -> None:
    """Writes machine info, ``extra`` and every comparison to ``path`` (dirs created)."""
    payload = {"machine": machine_info(), **(extra or {}),
               "results": [comparison_record(c) for c in comparisons]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2, allow_nan=False)
        f.write("\n")


def write_payload(path: str, payload: dict[str, Any]) -> None:
    """Writes any JSON-ready dict to ``path`` (dirs created; non-finite floats as strings)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=2, allow_nan=False)
        f.write("\n")
