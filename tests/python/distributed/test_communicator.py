"""The communicator knows blocks only through their contract (factors(), inverse_cost(), the
decomposition template) and puts every collective's tensors on the group's device."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import support as w
from natgrad.distributed import group_device

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def test_blocks_are_averaged_and_assigned_through_their_contract(tmp_path):
    out = tmp_path / "out.pt"
    mp.spawn(w.communicator_contract, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for r in ranks:
        assert r["device"] == "cpu"
        for packing in (True, False):
            # weights 1/3, 2/3: the sample-weighted mean of rank+1 is 1/3 + 4/3 = 5/3
            for got, block in zip(r[f"factors_{packing}"], w.opaque_blocks(0)):
                torch.testing.assert_close(got["S"], block.state["S"] * 5 / 3, rtol=1e-14, atol=0)
                torch.testing.assert_close(got["v"], block.state["v"] * 5 / 3, rtol=1e-14, atol=0)
        # matrices 5, 2, 3 and their vectors: 25+4+9 + 10 numbers, or 15+3+6 + 10 as triangles
        assert r["bytes_False"] == 48 * 8 and r["bytes_True"] == 34 * 8
        assert r["owner"] == {"big": 0, "mid": 1, "small": 1}  # by inverse_cost: 125 | 27 + 8
        for name, owner in r["owner"].items():
            assert torch.equal(r["inverses"][name], torch.full_like(r["inverses"][name], float(owner)))
        assert r["agree"] == [True, False, False]
        assert r["mean"] == 0.5
    assert ranks[0]["factors_True"][0]["S"].equal(ranks[1]["factors_True"][0]["S"])


@pytest.mark.parametrize(("backend", "expected"), [
    ("gloo", "cpu"), ("mpi", "cpu"), ("nccl", "cuda:1"), ("cpu:gloo,cuda:nccl", "cpu"), ("cuda:nccl", "cuda:1"),
])
def test_group_device_follows_the_backend(monkeypatch, backend, expected):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert group_device() == torch.device(expected)
