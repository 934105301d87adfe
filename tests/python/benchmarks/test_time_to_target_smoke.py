"""Smoke test of benchmarks/time_to_target.py: the quick protocol on a tiny budget and tiny
data, end to end (every workload, every optimizer; no assertion on any time)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "time_to_target.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

from ttt.optimizers import OPTIMIZERS  # noqa: E402
from ttt.workloads import WORKLOADS  # noqa: E402


def _missing_requirements() -> str | None:
    """Why the run cannot work here (None when it can)."""
    for module in ("matplotlib", "tqdm", "scipy"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (see requirements-dev.txt)"
    from data import DatasetMissingError, load_fashion_mnist
    try:
        load_fashion_mnist(train_size=1, test_size=1)
    except DatasetMissingError as e:
        return str(e)
    if not os.path.isdir("/usr/share/games/fortunes"):
        return "Debian's fortunes package is not installed (char_lm)"
    return None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    reason = _missing_requirements()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("ttt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--smoke", "--trials", "1", "--evals", "1",
                           "--budget-scale", "0.002", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"time_to_target.py failed:\n{proc.stdout}\n{proc.stderr}"
    with open(out / "time_to_target_quick.json") as f:
        return json.load(f), out, proc.stdout


def test_json_pngs_and_table_are_written(smoke_run: tuple[dict, Path, str]) -> None:
    payload, out, stdout = smoke_run
    assert set(payload["workloads"]) == set(WORKLOADS)
    for name in WORKLOADS:
        assert (out / f"time_to_target_quick_{name}.png").stat().st_size > 5_000
    assert (out / "time_to_target_quick_summary.png").stat().st_size > 5_000
    assert {"machine", "protocol", "optimizers", "unavailable", "wall_time_s"} <= set(payload)
    assert "process_time" in payload["protocol"]["clock"]
    for header in ("CPU s to target", "× AdamW", "target (fashion_mlp)"):
        assert header in stdout


def test_every_optimizer_appears_with_its_search_space(smoke_run: tuple[dict, Path, str]) -> None:
    payload, _, stdout = smoke_run
    assert set(payload["optimizers"]) == set(OPTIMIZERS)
    for name, spec in payload["optimizers"].items():
        adaptive = spec["fixed"].get("adaptive_learning_rate", False)  # no lr: the quadratic model sets it
        assert spec["space"] and ("lr" in spec["space"]) != adaptive and "schedule" in spec
    for w in payload["workloads"].values():
        ran, skipped = set(w["scores"]), set(payload["unavailable"]) | set(w["not_run"])
        assert ran | skipped == set(OPTIMIZERS) and not ran & skipped
        assert {"AdamW", "natgrad.KFAC", "natgrad.EKFAC", "natgrad.EigenAdam", "natgrad.EigenAdam-shampoo", "SGD",
                "Muon"} <= ran
    for name, reason in payload["unavailable"].items():
        assert reason and f"{name}: not run" in stdout


def test_every_run_has_a_curve_and_the_scores_are_consistent(smoke_run: tuple[dict, Path, str]) -> None:
    payload = smoke_run[0]
    for w in payload["workloads"].values():
        assert math.isfinite(w["target"])
        assert w["scores"]["AdamW"]["reached"]  # its own target: at least 2 of 3 seeds
        for o, trials in w["trials"].items():
            assert len(trials) == 1 and len(w["seed_runs"][o]) == 2
            for r in trials + w["seed_runs"][o]:
                assert r["curve"] and r["curve"][0]["step"] == 0 and r["steps"] >= 1
                assert w["metric"] in r["curve"][0]
            assert len(w["scores"][o]["time_to_target_s"]) == 3
