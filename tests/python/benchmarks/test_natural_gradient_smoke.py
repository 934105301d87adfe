"""Smoke test of benchmarks/natural_gradient.py: ``--quick`` runs and writes a sane JSON and PNG.

The benchmark runs in a subprocess (it sets torch's thread count and imports matplotlib) with one
thread, which keeps it under a minute on a shared machine.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "natural_gradient.py"
OPTIMIZERS = ("SGD", "Adam", "DiagNGD", "NGD")

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    """Runs ``--quick`` once; returns (JSON payload, output dir, stdout)."""
    out = tmp_path_factory.mktemp("ngd_bench")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out-dir",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    with open(out / "natural_gradient.json") as f:
        return json.load(f), out, proc.stdout


def test_outputs_written(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    payload, out, stdout = quick_run
    png = out / "natural_gradient.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload["quick"] is True
    assert {"machine", "wall_s", "load_average", "problems", "step_cost", "memory", "goals"} <= set(payload)
    for text in ("iters to target", "s to SGD's final", "NGD/plain", "Peak step memory", "Goals from the issue"):
        assert text in stdout


def test_convergence_results(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    problems = quick_run[0]["problems"]
    assert set(problems) == {"logreg", "logreg-digits", "mlp", "fashion-mlp"}
    assert _finite(problems["logreg"]["optimum_loss"])
    for name, prob in problems.items():
        assert _finite(prob["target_loss"]) and _finite(prob["initial_loss"]), name
        assert set(prob["optimizers"]) == set(OPTIMIZERS)
        iters = prob["config"]["iters"]
        for opt_name, res in prob["optimizers"].items():
            assert len(res["curve"]) == iters + 1 and len(res["cum_time_s"]) == iters + 1
            assert all(map(_finite, res["curve"])), (name, opt_name)
            assert _finite(res["final_mean"]) and _finite(res["median_step_s"])
            assert res["median_step_s"] > 0
            it = res["iters_to_target"]
            assert it is None or (0 <= it <= iters and _finite(res["time_to_target_s"]))
        ngd = prob["optimizers"]["NGD"]
        assert ngd["final_mean"] < ngd["curve"][0], f"{name}: NGD did not lower the loss"
        # Adam's best final loss is the target, so Adam reaches it by construction.
        assert prob["optimizers"]["Adam"]["iters_to_target"] is not None


def test_step_cost_memory_and_goals(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    payload = quick_run[0]
    costs = payload["step_cost"]
    assert any(c["clock"] == "cpu" for c in costs)
    assert {(c["num_params"], c["n"]) for c in costs} == {(100_100, 64), (1_462_538, 128)}
    for c in costs:
        for key in ("plain_ms", "backward_ms", "step_ms", "ngd_total_ms", "ratio_total", "ratio_step"):
            assert _finite(c[key]) and c[key] > 0, key
        if c["num_params"] == 100_100:  # the explicit (torch.func) path and the bare op beside it
            assert _finite(c["ratio_explicit_total"]) and _finite(c["ratio_op"])
    for m in payload["memory"]:
        assert m["plain_peak_mb"] > 0 and _finite(m["ratio_implicit"])
    if payload["memory"]:  # explicit rows hold U (n x p): far more than the implicit ones
        linear = next(m for m in payload["memory"] if m["name"].startswith("linear"))
        assert linear["ratio_explicit"] > 5 * linear["ratio_implicit"]
    goals = payload["goals"]
    assert isinstance(goals["iterations"]["met"], bool)
    assert isinstance(goals["step_cost"]["met"], bool)
    assert {g["model"] for g in goals["step_cost"]["steps"]} == {c["name"] for c in costs}
    assert set(goals["iterations"]["per_problem"]) == set(payload["problems"])
