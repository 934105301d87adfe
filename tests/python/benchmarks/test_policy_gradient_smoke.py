"""Smoke test of benchmarks/policy_gradient.py: ``--quick`` runs on CartPole and writes a sane JSON
and PNG (a subprocess with one thread; a few seconds of CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytest.importorskip("gymnasium")
pytest.importorskip("matplotlib")


def test_quick_run_writes_results(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "policy_gradient.py"), "--quick",
                           "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Goal: NPG reaches 475" in proc.stdout
    payload = json.loads((tmp_path / "policy_gradient.json").read_text())
    assert payload["quick"] is True and set(payload["results"]) == {"PG+Adam", "NPG"}
    for res in payload["results"].values():
        (run,) = res["runs"]
        steps = [point[0] for point in run["curve"]]
        assert steps == sorted(steps) and steps[-1] >= payload["max_steps"]
        assert all(point[2] is None or 1 <= point[2] <= 500 for point in run["curve"])  # CartPole returns
    assert (tmp_path / "policy_gradient.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
