"""Unit tests of the time-to-target harness's logic (benchmarks/ttt): target and time to
target from curves, 'not reached', the seeds' median, the trial sampler, the schedule, and a
training clock that leaves evaluation out."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ttt import optimizers as opts  # noqa: E402
from ttt import protocol  # noqa: E402
from ttt.workloads import Workload  # noqa: E402


def curve(values, dt=1.0, batch=10):
    """A curve with one evaluation every ``dt`` training seconds and 5 steps."""
    return [{"step": 5 * i, "samples": 5 * i * batch, "train_cpu_s": dt * i, "train_wall_s": 2 * dt * i,
             "m": v} for i, v in enumerate(values)]


def run(values, seed=0, **kw):
    return {"seed": seed, "curve": curve(values, **kw)}


# ---- target and time to target ----------------------------------------------------------------

def test_best_value_ignores_non_finite_points():
    assert protocol.best_value(curve([3.0, 2.0, math.inf, 2.5]), "m") == 2.0
    assert protocol.best_value(curve([math.inf, math.nan]), "m") == math.inf


def test_target_is_median_of_adamw_seeds_best_values():
    runs = [run([3.0, 1.0, 1.5]), run([3.0, 2.0, 1.2]), run([3.0, 2.5, 1.8])]
    # best values 1.0, 1.2, 1.8 -> median 1.2
    assert protocol.target_of(runs, "m") == pytest.approx(1.2)


def test_first_reach_is_the_first_evaluation_at_or_below_the_target():
    c = curve([3.0, 2.0, 1.0, 0.5, 2.0])
    assert protocol.first_reach(c, "m", 1.0)["train_cpu_s"] == 2.0  # equality counts
    assert protocol.first_reach(c, "m", 1.5)["step"] == 10
    assert protocol.first_reach(c, "m", 0.1) is None
    assert protocol.first_reach(curve([1.0 + 1e-12]), "m", 1.0) is not None  # round-off tolerance


def test_score_reports_medians_steps_samples_and_ratio_with_spread():
    runs = [run([3, 2, 1], seed=0), run([3, 1, 1], seed=1), run([3, 2, 2, 1], seed=2)]
    s = protocol.score(runs, "m", target=1.0, baseline_time=2.0)
    assert s["time_to_target_s"] == [2.0, 1.0, 3.0]
    assert s["median_time_s"] == 2.0 and s["median_steps"] == 10 and s["median_samples"] == 100
    assert s["median_wall_s"] == 4.0
    assert s["reached"] and s["reached_seeds"] == 3
    assert s["ratio"] == 1.0 and s["ratio_min"] == 0.5 and s["ratio_max"] == 1.5


def test_not_reached_when_a_majority_of_seeds_miss():
    runs = [run([3, 1]), run([3, 2]), run([3, 2.5])]
    s = protocol.score(runs, "m", target=1.0, baseline_time=1.0)
    assert s["reached_seeds"] == 1 and not s["reached"]
    assert s["median_time_s"] == math.inf and s["median_steps"] == math.inf
    assert s["ratio"] == math.inf and s["ratio_max"] == math.inf


def test_one_seed_missing_out_of_three_still_has_a_median():
    runs = [run([3, 1]), run([3, 2, 1]), run([3, 2.5])]
    s = protocol.score(runs, "m", target=1.0)
    assert s["median_time_s"] == 2.0 and s["reached_seeds"] == 2 and s["ratio"] is None


def test_seeds_median_treats_not_reached_as_infinite():
    assert protocol.median([1.0, math.inf, 3.0]) == 3.0
    assert protocol.median([math.inf, math.inf, 3.0]) == math.inf
    assert protocol.median([4.0, 2.0]) == 3.0
    assert protocol.median([]) == math.inf


def test_summarize_adamw_reaches_its_own_target_with_ratio_one():
    runs = {"AdamW": [run([3, 1.5, 1.0], seed=s) for s in range(3)],
            "X": [run([3, 0.9, 0.8], seed=s) for s in range(3)]}
    trials = {o: [r] for o, r in ((o, runs[o][0]) for o in runs)}
    for rs in trials.values():
        rs[0]["best"] = protocol.best_value(rs[0]["curve"], "m")
    out = protocol.summarize("m", trials, {"AdamW": 0, "X": 0}, runs)
    assert out["target"] == 1.0
    assert out["scores"]["AdamW"]["ratio"] == 1.0
    assert out["scores"]["X"]["ratio"] == 0.5


def test_pick_best_prefers_lowest_best_value_then_first():
    trials = [{"best": 2.0}, {"best": 1.0}, {"best": math.inf}, {"best": 1.0}]
    assert protocol.pick_best(trials) == 1


# ---- sampler and schedule ---------------------------------------------------------------------

@pytest.mark.parametrize("name", [o for o in opts.OPTIMIZERS])
def test_sampler_is_deterministic_and_in_bounds(name):
    a = opts.sample_trials(name, 8, seed=0)
    assert a == opts.sample_trials(name, 8, seed=0)
    assert a != opts.sample_trials(name, 8, seed=1)
    assert len(a) == 8 and len({tuple(t.values()) for t in a}) == 8
    for t in a:
        assert set(t) == set(opts.SPACES[name])
        for k, (lo, hi, _) in opts.SPACES[name].items():
            assert lo <= t[k] <= hi


def test_log_uniform_mapping_hits_the_ends_and_the_geometric_middle():
    space = {"lr": (1e-4, 1e-2, "log"), "w": (0.0, 1.0, "linear")}
    assert opts.to_space([0.0, 0.0], space) == pytest.approx({"lr": 1e-4, "w": 0.0})
    assert opts.to_space([0.5, 0.25], space) == pytest.approx({"lr": 1e-3, "w": 0.25})
    assert opts.to_space([1.0, 1.0], space) == pytest.approx({"lr": 1e-2, "w": 1.0})


def test_sampler_spreads_the_learning_rate_over_its_range():
    lrs = sorted(math.log10(t["lr"]) for t in opts.sample_trials("AdamW", 6))
    lo, hi = (math.log10(v) for v in opts.SPACES["AdamW"]["lr"][:2])
    assert lrs[0] < lo + 0.4 * (hi - lo) and lrs[-1] > lo + 0.6 * (hi - lo)


def test_schedule_warms_up_then_decays_to_zero():
    f = opts.schedule_factor
    assert f(0.0) == pytest.approx(0.01) and f(0.025) == pytest.approx(0.5)
    assert f(0.05) == pytest.approx(1.0) and f(1.0) == pytest.approx(0.0, abs=1e-12)
    values = [f(p / 100) for p in range(5, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ---- the clock --------------------------------------------------------------------------------

class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_workload(clock: FakeClock, step_cost: float, eval_cost: float, evaluate_extra=None) -> Workload:
    """A tiny regression problem whose steps and evaluations cost known clock amounts."""
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5])

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(3, 1)

    def sample(gen: torch.Generator):
        idx = torch.randint(0, 64, (16,), generator=gen)
        return x[idx], y[idx]

    def loss(model: nn.Module, batch) -> torch.Tensor:
        clock.now += step_cost
        return F.mse_loss(model(batch[0]).squeeze(1), batch[1])

    def evaluate(model: nn.Module) -> dict[str, float]:
        clock.now += eval_cost
        if evaluate_extra is not None:
            evaluate_extra()
        with torch.no_grad():
            return {"val_mse": float(F.mse_loss(model(x).squeeze(1), y))}

    return Workload("fake", "val_mse", 1.0, 16, make, sample, loss, evaluate, io_modules=())


def test_training_clock_excludes_evaluation():
    clock = FakeClock()
    step = 1 / 64  # binary fractions: the sums are exact
    w = fake_workload(clock, step_cost=step, eval_cost=5.0)
    rec = protocol.run_trial(w, "AdamW", {"lr": 1e-2, "weight_decay": 1e-4}, seed=0, budget_s=1.0, evals=8,
                             clock=clock)
    assert rec["steps"] == 64  # 1.0 s of training at 1/64 s per step
    assert rec["train_cpu_s"] == 1.0
    assert rec["eval_cpu_s"] == 5.0 * len(rec["curve"])
    assert len(rec["curve"]) == 9  # at 0, then every 1/8 s of training
    times = [p["train_cpu_s"] for p in rec["curve"]]
    assert times[0] == 0.0 and times == sorted(times) and times[-1] == pytest.approx(1.0)
    for p in rec["curve"]:
        assert p["train_cpu_s"] == step * p["step"]  # no evaluation time in it
        assert p["step"] % 8 == 0
        assert p["samples"] == 16 * p["step"]
    assert rec["curve"][-1]["val_mse"] < rec["curve"][0]["val_mse"]


def test_training_clock_excludes_evaluation_with_the_real_process_clock():
    """Evaluation burns >= 0.3 s of process CPU time each; the training budget is 0.05 s: the
    recorded training time stays below one evaluation's cost (no assertion on a speed)."""
    burn = 0.3

    def burn_cpu() -> None:
        t0 = time.process_time()
        while time.process_time() - t0 < burn:
            pass

    w = fake_workload(FakeClock(), 0.0, 0.0, evaluate_extra=burn_cpu)
    rec = protocol.run_trial(w, "SGD", {"lr": 0.01, "one_minus_momentum": 0.1}, seed=0, budget_s=0.05,
                             evals=2)
    assert rec["eval_cpu_s"] >= burn * len(rec["curve"])
    assert 0.05 <= rec["train_cpu_s"] < burn
    assert all(p["train_cpu_s"] < burn for p in rec["curve"])


def test_divergent_run_stops_and_is_marked():
    clock = FakeClock()
    w = fake_workload(clock, step_cost=0.01, eval_cost=0.0)
    rec = protocol.run_trial(w, "SGD", {"lr": 1e3, "one_minus_momentum": 0.1}, seed=0, budget_s=1.0, evals=10,
                             clock=clock)
    assert rec["diverged"] and rec["curve"][-1]["val_mse"] == math.inf and rec["train_cpu_s"] < 1.0
