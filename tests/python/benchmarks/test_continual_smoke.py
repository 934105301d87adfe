"""Smoke test of benchmarks/continual.py: the digits-sized ``--quick`` run end to end.

Only checks that the benchmark runs and writes well-formed results (JSON keys, accuracies in
[0, 1], the plot); the accuracy goals are measured by the full run, not here.
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks")

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_continual_quick(tmp_path, capsys) -> None:
    sys.path.insert(0, os.path.abspath(BENCH_DIR))
    try:
        import continual
    finally:
        sys.path.pop(0)
    continual.main(["--quick", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Fisher estimation" in out and "avg acc" in out

    with open(tmp_path / "continual.json") as f:
        payload = json.load(f)
    assert (tmp_path / "continual.png").stat().st_size > 0
    for key in ("machine", "quick", "config", "wall_s", "scenarios", "fisher_timing", "goals"):
        assert key in payload, key
    assert payload["quick"] is True
    assert set(payload["scenarios"]) == set(continual.SCENARIOS)
    assert (tmp_path / "continual_lambda.png").stat().st_size > 0
    for name, scenario in payload["scenarios"].items():
        expected = set(continual.QUICK["methods"]) - ({"kfac_opt"} if name == "permuted_adam" else set())
        assert set(scenario["methods"]) == expected, name
        for m in scenario["methods"].values():
            for key in ("lambda", "avg_acc", "first_task_acc", "acc_matrix_mean", "memory_per_task_bytes", "runs",
                        "val_avg_by_lambda", "best_lambda_position", "diverged_by_lambda"):
                assert key in m, key
            assert str(float(m["lambda"])) in m["val_avg_by_lambda"] or str(m["lambda"]) in m["val_avg_by_lambda"]
            assert 0.0 <= m["avg_acc"][0] <= 1.0
            assert all(0.0 <= mean <= 1.0 for mean, _ in m["first_task_acc"])
            for run in m["runs"]:
                for row in run["test"]:
                    assert all(0.0 <= v <= 1.0 for v in row if not isinstance(v, str))  # NaN -> "nan"
    timing = payload["fisher_timing"]
    assert timing["error"] is None  # EWC.consolidate's Fisher equals the per-sample loop's
    assert timing["natgrad_median_s"] > 0 and timing["loop_median_s"] > 0
    assert len(payload["goals"]) == 4  # the goals with what was measured


def test_lambda_grid_extends_until_the_best_is_interior() -> None:
    sys.path.insert(0, os.path.abspath(BENCH_DIR))
    try:
        import continual
    finally:
        sys.path.pop(0)
    seen = []

    def score(lam):  # peaked at λ = 1e4, far above the initial grid
        seen.append(lam)
        return -abs(math.log10(lam) - 4.0)

    curve, best, where = continual.tune(score, (10.0, 31.62, 100.0), max_extensions=8)
    assert best == 1e4 and where == "interior"
    assert sorted(curve) == sorted(seen) and max(curve) == 31620.0  # one step past the peak
    curve, best, where = continual.tune(score, (10.0, 31.62, 100.0), max_extensions=2)
    assert where == "upper edge" and best == 1000.0 and len(curve) == 5  # the budget is the cap
