"""The protocol: one run on a CPU-time budget with evaluation off the clock, the tuning
(same trial count for everyone, seed 0, best trial rerun on more seeds), AdamW's target and
every optimizer's time to it.

The clock is ``time.process_time()`` by default: CPU seconds of the whole process (both torch
threads), summed over the training steps only (batch sampling, forward, backward, optimizer
step). Evaluation runs between two readings of the clock and is never added. Process CPU time
is what other processes on a shared machine disturb least (wall-clock counts the time the run
waits for a core); each evaluation point also records the training wall-clock for reference.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .optimizers import make_trainer, sample_trials, schedule_factor
from .workloads import Batch, Workload

Clock = Callable[[], float]
DIVERGENCE_FACTOR = 10.0  # a run whose metric exceeds 10x its initial value (or is not finite) stops


def reached(value: float, target: float) -> bool:
    """Whether ``value`` is at or below ``target`` (lower is better; round-off tolerance)."""
    return math.isfinite(value) and value <= target + 1e-9 * abs(target)


def run_trial(workload: Workload, optimizer: str, hp: dict[str, float], seed: int, budget_s: float,
              evals: int, clock: Clock = time.process_time,
              on_progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Trains a fresh model of ``workload`` with ``optimizer`` at ``hp`` until the training
    clock reaches ``budget_s``, evaluating after every ``budget_s / evals`` training seconds
    (and at 0 and at the end). The learning rate follows :func:`schedule_factor` of the
    training-clock progress.

    Returns a JSON-ready record; ``curve`` holds one point per evaluation with ``step``,
    ``samples``, ``train_cpu_s`` (the clock), ``train_wall_s`` and the validation metrics.
    ``on_progress(seconds)`` is told how much of the budget each stretch used.
    """
    model = workload.make_model(seed)
    trainer = make_trainer(optimizer, model, hp, workload.io_modules, workload.kfac_kwargs,
                           (workload.likelihood, workload.nll_scale))
    gen = torch.Generator().manual_seed(10_000 + seed)
    curve: list[dict[str, Any]] = []
    trained = wall = eval_clock = 0.0
    step = 0
    diverged = False
    reported = 0.0

    def evaluate() -> float:
        nonlocal eval_clock
        t0 = clock()
        metrics = workload.evaluate(model)
        eval_clock += clock() - t0
        curve.append({"step": step, "samples": step * workload.batch_size, "train_cpu_s": trained,
                      "train_wall_s": wall, **metrics})
        return metrics[workload.metric]

    initial = evaluate()
    interval = budget_s / evals
    next_eval = interval
    while trained < budget_s:
        trainer.set_schedule(schedule_factor(trained / budget_s))
        t0, w0 = clock(), time.perf_counter()
        batch = workload.sample_batch(gen)
        if trainer.closure_step:
            def closure(batch: Batch = batch) -> torch.Tensor:
                trainer.zero_grad()
                out = workload.train_loss(model, batch)
                out.backward()
                return out

            loss = trainer.step(closure)
        else:
            trainer.zero_grad()
            loss = workload.train_loss(model, batch)
            loss.backward()
            trainer.step()
        trained += clock() - t0
        wall += time.perf_counter() - w0
        step += 1
        if not math.isfinite(float(loss.detach())):
            diverged = True
        if diverged or trained >= next_eval or trained >= budget_s:
            value = evaluate()
            while next_eval <= trained:
                next_eval += interval
            if not math.isfinite(value) or value > DIVERGENCE_FACTOR * abs(initial):
                diverged = True
            if on_progress is not None:
                done = min(trained, budget_s)
                on_progress(done - reported)
                reported = done
            if diverged:
                curve[-1][workload.metric] = math.inf
                break
    if on_progress is not None and reported < budget_s:
        on_progress(budget_s - reported)
    return {"optimizer": optimizer, "hp": hp, "seed": seed, "budget_s": budget_s, "curve": curve,
            "steps": step, "train_cpu_s": trained, "train_wall_s": wall, "eval_cpu_s": eval_clock,
            "diverged": diverged, "best": best_value(curve, workload.metric)}


# ---- scoring ----------------------------------------------------------------------------------

def best_value(curve: Sequence[dict[str, Any]], metric: str) -> float:
    """The lowest finite value of ``metric`` on the curve (inf if none)."""
    values = [p[metric] for p in curve if math.isfinite(p[metric])]
    return min(values) if values else math.inf


def first_reach(curve: Sequence[dict[str, Any]], metric: str, target: float) -> dict[str, Any] | None:
    """The first evaluation point at or below ``target`` (None: not reached)."""
    for p in curve:
        if reached(p[metric], target):
            return p
    return None


def median(values: Sequence[float]) -> float:
    """Median, with inf ('not reached') sorted last: of 3 seeds, 2 must reach for a finite one."""
    return float(statistics.median(values)) if values else math.inf


def target_of(runs: Sequence[dict[str, Any]], metric: str) -> float:
    """AdamW's target: the median over its seeds of the best ``metric`` each reaches."""
    return median([best_value(r["curve"], metric) for r in runs])


def score(runs: Sequence[dict[str, Any]], metric: str, target: float,
          baseline_time: float | None = None) -> dict[str, Any]:
    """Time, steps and samples to ``target`` per seed and their medians (inf: not reached);
    the ratio of the median time to ``baseline_time`` (AdamW's median) with the seeds' spread
    (each seed's time over the baseline's median)."""
    hits = [first_reach(r["curve"], metric, target) for r in runs]
    times = [h["train_cpu_s"] if h else math.inf for h in hits]
    steps = [h["step"] if h else math.inf for h in hits]
    samples = [h["samples"] if h else math.inf for h in hits]
    walls = [h["train_wall_s"] if h else math.inf for h in hits]
    med = median(times)
    out: dict[str, Any] = {
        "seeds": [r["seed"] for r in runs], "time_to_target_s": times, "steps_to_target": steps,
        "samples_to_target": samples, "wall_to_target_s": walls,
        "median_time_s": med, "median_steps": median(steps), "median_samples": median(samples),
        "median_wall_s": median(walls), "reached_seeds": sum(h is not None for h in hits),
        "reached": math.isfinite(med), "best_values": [best_value(r["curve"], metric) for r in runs],
        "median_best": median([best_value(r["curve"], metric) for r in runs]),
        "ratio": None, "ratio_min": None, "ratio_max": None}
    if baseline_time is not None and math.isfinite(baseline_time) and baseline_time > 0:
        out["ratio"] = med / baseline_time
        out["ratio_min"] = min(times) / baseline_time
        out["ratio_max"] = max(times) / baseline_time
    return out


def pick_best(trials: Sequence[dict[str, Any]]) -> int:
    """Index of the trial with the best validation metric within the budget (first on ties)."""
    return min(range(len(trials)), key=lambda i: (trials[i]["best"], i))


# ---- tuning -----------------------------------------------------------------------------------

def run_workload(workload: Workload, optimizers: Sequence[str], trials: int, extra_seeds: Sequence[int],
                 budget_s: float, evals: int, sampler_seed: int = 0,
                 on_run: Callable[[str], None] | None = None,
                 on_progress: Callable[[float], None] | None = None,
                 clock: Clock = time.process_time) -> dict[str, Any]:
    """The whole protocol on one workload. Stage 1: ``trials`` quasi-random trials of every
    optimizer on seed 0 (optimizers alternate, so load from other processes falls on all of
    them alike). Stage 2: each optimizer's best trial on ``extra_seeds``. Then AdamW's target
    and every optimizer's score."""
    hps = {o: sample_trials(o, trials, sampler_seed) for o in optimizers}
    tuning: dict[str, list[dict[str, Any]]] = {o: [] for o in optimizers}

    def go(o: str, hp: dict[str, float], seed: int, label: str) -> dict[str, Any]:
        if on_run is not None:
            on_run(f"{workload.name} {o} {label} seed {seed}")
        return run_trial(workload, o, hp, seed, budget_s, evals, clock=clock, on_progress=on_progress)

    for i in range(trials):
        for o in optimizers:
            tuning[o].append(go(o, hps[o][i], 0, f"trial {i + 1}/{trials}"))
    best = {o: pick_best(tuning[o]) for o in optimizers}
    seeds: dict[str, list[dict[str, Any]]] = {o: [tuning[o][best[o]]] for o in optimizers}
    for s in extra_seeds:
        for o in optimizers:
            seeds[o].append(go(o, hps[o][best[o]], s, "best trial"))
    return summarize(workload.metric, tuning, best, seeds)


def summarize(metric: str, tuning: dict[str, list[dict[str, Any]]], best: dict[str, int],
              seeds: dict[str, list[dict[str, Any]]], baseline: str = "AdamW") -> dict[str, Any]:
    """Target (the baseline's) and every optimizer's score from the runs."""
    target = target_of(seeds[baseline], metric)
    base = score(seeds[baseline], metric, target)["median_time_s"]
    scores = {o: score(runs, metric, target, base) for o, runs in seeds.items()}
    return {"metric": metric, "baseline": baseline, "target": target, "best_trial": best,
            "trials": tuning, "seed_runs": {o: runs[1:] for o, runs in seeds.items()},
            "scores": scores}
