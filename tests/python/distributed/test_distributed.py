"""natgrad on torch.distributed (gloo, spawned local processes) equals one process on the whole
batch: K-FAC for every grad-worker fraction with and without DDP, checkpoints across world
sizes, collective NaN skips, sharded EWC Fisher and NaturalGradient."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import support as w
import natgrad
from natgrad.distributed import assign_by_cost, pack_triangle, unpack_triangle

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def spawn(fn, world, tmp_path, *args):
    store = tmp_path / f"store_{fn.__name__}_{world}"
    mp.spawn(fn, args=(world, str(store), *args), nprocs=world, join=True)


def single_process(steps=5):
    x, y = w.dist_data()
    net = w.dist_model()
    w.run_steps(net, w.dist_kfac(net), x, y, steps)
    return w.flat_params(net)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("use_ddp", [False, True])
def test_kfac_equals_single_process_for_every_grad_worker_fraction(world, use_ddp, tmp_path):
    out = tmp_path / "out.pt"
    spawn(w.kfac_fractions, world, tmp_path, str(out), use_ddp)
    results = torch.load(out)
    expected = single_process()
    fractions = [k for k in results if isinstance(k, float)]
    assert len(fractions) == (3 if world == 3 else 2)
    for fraction in fractions:
        torch.testing.assert_close(results[fraction], expected, rtol=1e-10, atol=1e-12)
        assert results[f"identical_{fraction}"]
        sent = results[f"bytes_{fraction}"]
        assert sent["factors"] > 0
        assert (sent["gradients"] > 0) != use_ddp  # gradients averaged once: by DDP or by us
        if fraction < 1.0:
            assert sent["directions"] > 0
        else:
            assert sent["directions"] == 0 and sent["inverses"] > 0


@pytest.mark.parametrize("use_ddp", [False, True])
def test_adaptive_learning_rate_and_momentum_equal_single_process(use_ddp, tmp_path):
    out = tmp_path / "out.pt"
    spawn(w.adaptive_ranks, 2, tmp_path, str(out), use_ddp)
    result = torch.load(out)
    x, y = w.dist_data()
    net = w.dist_model()
    w.run_steps(net, w.dist_kfac_adaptive(net), x, y, 4)
    assert result["identical"]
    torch.testing.assert_close(result["params"], w.flat_params(net), rtol=1e-10, atol=1e-12)


def test_checkpoint_from_two_ranks_resumes_on_three(tmp_path):
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    spawn(w.checkpoint_save, 2, tmp_path, str(ckpt))
    spawn(w.checkpoint_load, 3, tmp_path, str(ckpt), str(out))
    torch.testing.assert_close(torch.load(out), single_process(steps=6), rtol=1e-10, atol=1e-12)


def test_nan_on_one_rank_is_skipped_by_every_rank(tmp_path):
    out = tmp_path / "out.pt"
    spawn(w.nan_on_one_rank, 2, tmp_path, str(out))
    result = torch.load(out)
    first, second = result["params"]
    assert torch.equal(first, second) and torch.isfinite(first).all()
    assert result["skips"]  # the layers were skipped (and counted) on every rank


def test_sharded_ewc_fisher_and_natural_gradient_equal_the_full_batch(tmp_path):
    out = tmp_path / "out.pt"
    spawn(w.sharded_fisher, 3, tmp_path, str(out))
    result = torch.load(out)
    x, y = w.dist_data()
    net = w.dist_model()
    full = natgrad.EWC(net, fisher_type="exact", structure="kfac")
    full.consolidate(x, y)
    for key, (a, g) in full.state_dict()["tasks"][0]["kron"].items():
        torch.testing.assert_close(result["kfac"]["kron"][key][0], a, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(result["kfac"]["kron"][key][1], g, rtol=1e-10, atol=1e-13)
    diag = natgrad.EWC(net)
    diag.consolidate(x, y)
    for name, value in diag.tasks[0]["diag"].items():
        torch.testing.assert_close(result["diag"]["diag"][name], value, rtol=1e-10, atol=1e-14)
    ngd_net = w.dist_model()
    ngd = natgrad.NaturalGradient(ngd_net, lr=0.5, damping=1e-2, momentum=0.5)
    for _ in range(2):
        ngd.zero_grad()
        ngd.backward(x, y)
        ngd.step()
    torch.testing.assert_close(result["ngd"], w.flat_params(ngd_net), rtol=1e-10, atol=1e-12)


def test_triangle_packing_round_trips():
    a = torch.randn(7, 7, dtype=torch.float64)
    sym = a + a.T
    packed = pack_triangle(sym)
    assert packed.numel() == 7 * 8 // 2
    assert torch.equal(unpack_triangle(packed, 7), sym)


def test_inverse_assignment_balances_cost():
    costs = [512.0**3, 256.0**3, 256.0**3, 128.0**3, 128.0**3, 64.0**3, 10.0**3]
    owners = assign_by_cost(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(loads) <= 1.01 * max(costs[0], sum(costs) / 2)  # the big layer alone, others share
    assert assign_by_cost(costs, 3) == assign_by_cost(costs, 3)  # deterministic on every rank
    assert set(assign_by_cost([1.0] * 6, 3)) == {0, 1, 2}


def test_distributed_benchmark_quick_runs(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = tmp_path / "d.json"
    env = {**os.environ, "PYTHONPATH": str(root / "python")}
    subprocess.run([sys.executable, str(root / "benchmarks" / "distributed.py"), "--quick", "--out", str(out)],
                   check=True, env=env, timeout=300)
    results = json.loads(out.read_text())["results"]
    full = results["K-FAC full factors, f=1"]["bytes_per_step"]["factors"]
    packed = results["K-FAC triangles, f=1"]["bytes_per_step"]["factors"]
    assert 0.45 < packed / full < 0.6  # n(n+1)/2 of n² numbers
    assert results["K-FAC triangles, f=1/world"]["bytes_per_step"]["directions"] > 0
