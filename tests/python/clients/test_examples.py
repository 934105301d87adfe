"""The client-library examples train: examples/lightning_kfac.py (fit, then resume from a checkpoint
with the same losses as the uninterrupted run) and examples/hf_trainer_kfac.py (Hugging Face's
Trainer with natgrad.KFAC; its checkpoint resume too). Small runs."""
from __future__ import annotations

import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples")


def example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lightning_fit_then_resume_gives_the_uninterrupted_losses(tmp_path):
    pytest.importorskip("lightning")
    lightning_kfac = example("lightning_kfac")
    whole, _ = lightning_kfac.fit(2, str(tmp_path / "whole"))
    steps = len(whole.losses) // 2
    assert sum(whole.losses[-5:]) / 5 < 0.5 * sum(whole.losses[:5]) / 5, "the loss falls"
    first, _ = lightning_kfac.fit(1, str(tmp_path / "parts"))
    assert first.losses == whole.losses[:steps]
    checkpoint = next(p for p in (tmp_path / "parts").iterdir() if p.name.startswith("epoch=0"))
    resumed, trainer = lightning_kfac.fit(2, str(tmp_path / "parts"), ckpt_path=str(checkpoint))
    assert resumed.losses == whole.losses[steps:]
    assert trainer.optimizers[0].state_dict()["kfac"]["steps"] == 2 * steps


def test_hf_trainer_trains_and_resumes_with_the_uninterrupted_losses(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    hf_trainer_kfac = example("hf_trainer_kfac")
    whole, validation = hf_trainer_kfac.train(20, str(tmp_path / "whole"), save_steps=10)
    assert sum(whole[-3:]) / 3 < sum(whole[:3]) / 3 - 0.3, "the loss falls"
    assert validation < whole[0]
    hf_trainer_kfac.train(10, str(tmp_path / "parts"), save_steps=10)
    resumed, _ = hf_trainer_kfac.train(20, str(tmp_path / "parts"), resume=True, save_steps=10)
    assert resumed[-10:] == whole[10:]  # the log history holds the first run's 10 steps too
