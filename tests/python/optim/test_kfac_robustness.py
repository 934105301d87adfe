"""natgrad.KFAC under faults, mixed precision, unsupported layers and checkpoints."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from support import data, flat_params, mlp, train

ROOT = Path(__file__).resolve().parents[3]


def test_nan_gradient_skips_only_that_layer_and_warns_once():
    model = mlp()
    x, y = data()
    opt = natgrad.KFAC(model, lr=0.1)
    train(model, opt, x, y, 2)
    for step in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        model[2].weight.grad[0, 0] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        assert len([w for w in caught if "NaN or Inf" in str(w.message)]) == (1 if step == 0 else 0)
        after = list(model.parameters())
        assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])  # layer '2' untouched
        assert not torch.equal(after[0], before[0])  # the healthy layer still trains
    assert opt.nonfinite_skips == {"2": 2}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b.state["G"]).all() for b in opt.estimator.blocks)


def test_nan_activations_leave_factors_untouched():
    model = mlp()
    x, y = data()
    opt = natgrad.KFAC(model, lr=0.1)
    train(model, opt, x, y, 1)
    saved = {b.name: (b.state["A"].clone(), b.state["G"].clone()) for b in opt.estimator.blocks}
    bad = x.clone()
    bad[0, 0] = float("inf")
    opt.zero_grad()
    F.cross_entropy(model(bad), y).backward()
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    first, second = opt.estimator.blocks  # only layer '0' sees the Inf (tanh maps it to ±1 for layer '2')
    assert torch.equal(first.state["A"], saved["0"][0]) and torch.equal(first.state["G"], saved["0"][1])
    assert not torch.equal(second.state["A"], saved["2"][0])
    assert opt.nonfinite_skips["0"] >= 1 and "2" not in opt.nonfinite_skips
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cpu_autocast_bfloat16_trains_with_float32_factors():
    model = mlp(torch.float32)
    x, y = data(n=64, dtype=torch.float32)
    opt = natgrad.KFAC(model, lr=0.2, damping=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(b.state["G"].dtype == torch.float32 for b in opt.estimator.blocks)
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bfloat16_model_keeps_float32_curvature_and_matches_a_float32_run():
    reference, model = mlp(torch.float32), mlp(torch.float32).to(torch.bfloat16)
    x, y = data(n=64, dtype=torch.float32)
    opts = [natgrad.KFAC(m, lr=0.2, damping=1e-2) for m in (reference, model)]
    losses: list[list[float]] = [[], []]
    for _ in range(15):
        for m, opt, seen in zip((reference, model), opts, losses):
            opt.zero_grad()
            loss = F.cross_entropy(m(x.to(m[0].weight.dtype)).float(), y)
            loss.backward()
            opt.step()
            seen.append(float(loss.detach()))
    assert all(t.dtype == torch.float32 for b in opts[1].estimator.blocks for t in b.state.values())
    assert losses[1][-1] < 0.8 * losses[1][0]
    assert abs(losses[1][-1] - losses[0][-1]) < 0.1 * losses[0][0]  # bfloat16 weights, not worse curvature
    assert not opts[1].estimator.ledger.ladder  # no fallback-ladder rung: nothing decomposed in half precision


def test_grad_scaler_unscales_gradients_and_factors():
    x, y = data(dtype=torch.float32)
    plain_model, scaled_model = mlp(torch.float32), mlp(torch.float32)
    plain = natgrad.KFAC(plain_model, lr=0.1)
    scaled = natgrad.KFAC(scaled_model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        train(plain_model, plain, x, y, 1)
        scaled.zero_grad()
        scaler.scale(F.cross_entropy(scaled_model(x), y)).backward()
        scaler.step(scaled)
        scaler.update()
    for a, b in zip(plain.estimator.blocks, scaled.estimator.blocks):
        torch.testing.assert_close(a.state["G"], b.state["G"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat_params(scaled_model), flat_params(plain_model), rtol=1e-5, atol=1e-6)
    # An overflow makes the scaler skip the step: parameters and factors unchanged.
    before = flat_params(scaled_model)
    scaled.zero_grad()
    scaler.scale(F.cross_entropy(scaled_model(x), y) * float("inf")).backward()
    scaler.step(scaled)
    scaler.update()
    assert torch.equal(flat_params(scaled_model), before)


class Mixed(nn.Module):
    """LayerNorm, a grouped conv, nn.MultiheadAttention (projections used functionally), a conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        h = self.grouped(torch.relu(self.conv(x)))  # [N, 4, 5, 5]
        seq = self.norm(h.flatten(2).transpose(1, 2))  # [N, 25, 4]
        seq, _ = self.attn(seq, seq, seq)
        return self.head(seq.mean(1)) * self.scale


def test_unsupported_layers_fall_back_and_training_runs():
    torch.manual_seed(0)
    model = Mixed()
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))
    opt = natgrad.KFAC(model, lr=0.05, damping=1e-2)
    losses = train(model, opt, x, y, 8)
    table = opt.describe()
    assert "conv.weight" in table and "K-FAC conv2d" in table
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    # every parameter here has a curvature block (none on the plain gradient)
    assert "diagonal" in rows["grouped.weight"] and "diagonal" in rows["norm.weight"]
    assert "K-FAC attention" in rows["attn.in_proj_weight"]
    assert "K-FAC linear" in rows["attn.out_proj.weight"]
    assert "diagonal" in rows["scale"] and "plain" not in table
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_hooks_are_removable_and_do_not_keep_the_optimizer_alive():
    model = mlp()
    opt = natgrad.KFAC(model)
    assert any(m._forward_hooks for m in model.modules())
    opt.remove_hooks()
    assert not any(m._forward_hooks for m in model.modules())
    opt = natgrad.KFAC(model)
    del opt
    gc.collect()
    assert not any(m._forward_hooks for m in model.modules())


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    sys.path.insert(0, {tests!r})
    import natgrad
    from support import data, mlp, train
    torch.use_deterministic_algorithms(True)
    model = mlp()
    x, y = data()
    opt = natgrad.KFAC(model, lr=0.2, factor_update_period=2, inverse_update_period=3, fisher_type="mc", seed=5)
    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            out = model(x)
            opt.sample_fisher(out)
            F.cross_entropy(out, y).backward()
            opt.step()
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "save":
        steps(4)
        torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, path)
    else:
        if mode == "resume":
            ckpt = torch.load(path, weights_only=False)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            steps(5)
        else:
            steps(9)
        torch.save([p.detach() for p in model.parameters()], path + "." + mode)
    """
)


def test_checkpoint_resumes_bitwise_in_a_new_process(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(Path(__file__).parents[1])))
    ckpt = str(tmp_path / "ckpt.pt")
    env = {"PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    for mode in ("save", "resume", "straight"):
        subprocess.run([sys.executable, str(script), mode, ckpt], check=True, env=env, timeout=120)
    resumed = torch.load(ckpt + ".resume")
    straight = torch.load(ckpt + ".straight")
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_foreign_checkpoints():
    opt = natgrad.KFAC(mlp())
    sgd = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not saved by natgrad.KFAC"):
        opt.load_state_dict(sgd.state_dict())
    other = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), nn.Linear(3, 3)).double()
    big = natgrad.KFAC(other)
    x, y = data()
    train(other, big, x, y, 1)
    small = natgrad.KFAC(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 3)).double())
    with pytest.raises(ValueError):
        small.load_state_dict(big.state_dict())


def test_conv_model_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 4))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))
    opt = natgrad.KFAC(model, lr=0.2, damping=1e-2, kl_clip=1e-2)
    losses = train(model, opt, x, y, 20)
    assert losses[-1] < 0.5 * losses[0]
