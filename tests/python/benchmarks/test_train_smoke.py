"""Smoke test of the training benchmark: ``benchmarks/train.py --quick`` end to end."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "train.py"
OPTIMIZERS = ("SGD", "Adam", "KFAC")


def _missing_requirements() -> str | None:
    """Why the quick run cannot work here (None when it can)."""
    for module in ("sklearn", "matplotlib", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (see requirements-dev.txt)"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from data import DatasetMissingError, load_fashion_mnist
        try:
            load_fashion_mnist(train_size=1, test_size=1)
        except DatasetMissingError as e:
            return str(e)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """Runs ``train.py --quick`` once in a subprocess; returns (JSON, out dir, stdout)."""
    reason = _missing_requirements()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("train")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"train.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    with open(out / "train.json") as f:
        return json.load(f), out, proc.stdout


def test_quick_run_writes_json_table_and_plot(quick_run: tuple[dict, Path, str]) -> None:
    payload, out, stdout = quick_run
    assert {"machine", "quick", "seeds", "wall_time_s", "goal", "tasks"} <= set(payload)
    assert payload["quick"] is True and payload["seeds"] == 1
    assert set(payload["tasks"]) == {"digits", "fashion_mlp", "autoencoder"}
    assert {"text", "met", "ratio", "adam_time_s"} <= set(payload["goal"])
    assert (out / "train.png").stat().st_size > 10_000
    for header in ("final loss", "steps→target", "time→target", "×SGD", "Goal:"):
        assert header in stdout


@pytest.mark.parametrize("task", ["digits", "fashion_mlp", "autoencoder"])
def test_quick_run_has_finite_results_for_every_optimizer(quick_run: tuple[dict, Path, str],
                                                          task: str) -> None:
    summary = quick_run[0]["tasks"][task]
    assert set(summary["optimizers"]) == set(OPTIMIZERS)
    assert math.isfinite(summary["target_loss"])
    for name in OPTIMIZERS:
        o = summary["optimizers"][name]
        assert {"best_lr", "grid", "final_loss_mean", "final_loss_std", "steps_to_target",
                "time_to_target_s", "median_step_s", "amortized_step_s",
                "step_time_ratio_vs_sgd", "amortized_ratio_vs_sgd", "curve"} <= set(o)
        assert o["best_lr"] in [g["lr"] for g in o["grid"]]
        assert o["best_config"] in summary["grids"][name] and "batch" in o["best_config"]
        assert o["picked"] in quick_run[2]  # the table says what each optimizer picked
        losses = o["curve"]["loss_mean"]
        assert losses and all(math.isfinite(v) for v in losses), (name, losses)
        assert math.isfinite(o["final_loss_mean"]) and o["median_step_s"] > 0
        assert len(o["curve"]["steps"]) == len(losses) == len(o["curve"]["time_s_mean"])
    assert summary["optimizers"]["SGD"]["step_time_ratio_vs_sgd"] == pytest.approx(1.0)
    # the same budget: grids of the same size, batch size in every one
    assert len({len(g) for g in summary["grids"].values()}) == 1
    assert all("batch" in c for g in summary["grids"].values() for c in g)


def test_kfac_decreases_the_digits_loss(quick_run: tuple[dict, Path, str]) -> None:
    curve = quick_run[0]["tasks"]["digits"]["optimizers"]["KFAC"]["curve"]["loss_mean"]
    assert curve[-1] < curve[0]
