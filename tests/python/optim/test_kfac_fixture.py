"""The committed fixture of the C++ frontend's parity tests (tests/fixtures/kfac_parity.pt,
checked by tests/cpp/test_frontend_kfac_parity.cpp) still is what the current natgrad.KFAC computes:
a change of the Python update rule fails here until the fixture is regenerated with
``python tests/fixtures/make_kfac_parity.py`` (and the C++ optimizer then follows it)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fixtures")


def _script():
    spec = importlib.util.spec_from_file_location("make_kfac_parity", os.path.join(FIXTURES, "make_kfac_parity.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated() -> tuple[dict, dict]:
    script = _script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fresh = script.build_fixture()
    finally:
        torch.set_num_threads(threads)
    committed = torch.load(script.PATH, weights_only=True)
    return fresh, committed


def test_committed_fixture_matches_current_natgrad_kfac(regenerated) -> None:
    fresh, committed = regenerated
    assert sorted(fresh) == sorted(committed)
    for key, value in fresh.items():
        torch.testing.assert_close(committed[key], value, rtol=1e-10, atol=1e-12, msg=lambda m: f"{key}: {m}")


def test_every_case_trains_every_parameter(regenerated) -> None:
    """Each case's final parameters differ from the initial ones (the fixture checks motion)."""
    fresh, _ = regenerated
    script = _script()
    for case, (model, _) in script.CASES.items():
        for key, value in fresh.items():
            if key.startswith(f"{case}/final/"):
                name = key[len(f"{case}/final/"):]
                assert not torch.equal(value, fresh[f"{model}/init/{name}"]), key
