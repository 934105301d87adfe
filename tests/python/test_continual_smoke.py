"""Smoke test of benchmarks/continual.py: the digits-sized ``--quick`` run end to end.

Only checks that the benchmark runs and writes well-formed results (JSON keys, accuracies in
[0, 1], the plot); the accuracy goals are measured by the full run, not here.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")

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
    for scenario in payload["scenarios"].values():
        assert set(scenario["methods"]) == set(continual.METHODS)
        for m in scenario["methods"].values():
            for key in ("lambda", "avg_acc", "first_task_acc", "acc_matrix_mean", "memory_per_task_bytes", "runs"):
                assert key in m, key
            assert 0.0 <= m["avg_acc"][0] <= 1.0
            assert all(0.0 <= mean <= 1.0 for mean, _ in m["first_task_acc"])
            for run in m["runs"]:
                for row in run["test"]:
                    assert all(0.0 <= v <= 1.0 for v in row if not isinstance(v, str))  # NaN -> "nan"
    timing = payload["fisher_timing"]
    assert timing["error"] is None  # EWC.consolidate's Fisher equals the per-sample loop's
    assert timing["natgrad_median_s"] > 0 and timing["loop_median_s"] > 0
    assert len(payload["goals"]) == 3
