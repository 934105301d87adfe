"""The reference values natgrad::EWC (C++) is tested against: natgrad.EWC on a small float64 model.

``python tests/python/ewc_cpp_fixture.py`` rewrites ``tests/cpp/data/ewc_parity.pt`` (a
``torch.save``'d dict of tensors that tests/cpp/test_frontend_ewc.cpp reads with torch::pickle_load);
tests/python/test_ewc_cpp_fixture.py checks that the committed file still matches what the
current Python natgrad.EWC computes.

Keys: ``init/<param>`` (θ₁), ``theta2/<param>``, ``theta3/<param>`` (the parameters at the second
consolidation and where the penalty is evaluated), ``x1, y1, x2, y2, yg`` (data; ``yg``: Gaussian
targets for ``x1``), and per case ``<case>/fisher<t>/<param>``, ``<case>/penalty``,
``<case>/grad/<param>`` for the cases ``separate`` (λ=3, task 1 on ``x1`` in one batch, task 2
on ``x2`` in batches of 5 and 7), ``online`` (the same in online mode, γ=0.7), and the Fisher
alone (``fisher0``) at θ₁ on ``x1`` for ``exact`` (categorical) and ``gaussian`` (empirical).
The model: Linear(6,5) → Tanh → LayerNorm(5) → Linear(5,3) (the LayerNorm's parameters take
the per-sample autograd path in both languages).
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "..", "cpp", "data", "ewc_parity.pt")
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))
from make_kfac_parity import exact_init  # noqa: E402  (the fixtures' one kernel-independent init)


def model() -> nn.Sequential:
    """The fixture's model with its fixed initial parameters (float64)."""
    return exact_init(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 3)).double(), 0)


def _shift(net: nn.Module, seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def build() -> dict[str, torch.Tensor]:
    """Every reference value (see the module docstring)."""
    import natgrad

    g = torch.Generator().manual_seed(1)
    out: dict[str, torch.Tensor] = {
        "x1": torch.randn(12, 6, generator=g, dtype=torch.float64),
        "y1": torch.randint(0, 3, (12,), generator=g),
        "x2": torch.randn(12, 6, generator=g, dtype=torch.float64),
        "y2": torch.randint(0, 3, (12,), generator=g),
    }
    out["yg"] = torch.randn(12, 3, generator=g, dtype=torch.float64)
    init = {n: p.detach().clone() for n, p in model().named_parameters()}
    out.update({f"init/{n}": t for n, t in init.items()})
    for case, kwargs in (("separate", dict(mode="separate")), ("online", dict(mode="online", gamma=0.7))):
        net = model()
        ewc = natgrad.EWC(net, 3.0, **kwargs)
        ewc.consolidate(out["x1"], out["y1"])
        theta2 = _shift(net, 2, 0.3)
        ewc.consolidate([(out["x2"][:5], out["y2"][:5]), (out["x2"][5:], out["y2"][5:])])
        theta3 = _shift(net, 3, 0.2)
        out.update({f"theta2/{n}": t for n, t in theta2.items()})
        out.update({f"theta3/{n}": t for n, t in theta3.items()})
        for t, task in enumerate(ewc.tasks):
            out.update({f"{case}/fisher{t}/{n}": f for n, f in task["diag"].items()})
        penalty = ewc.penalty()
        penalty.backward()
        out[f"{case}/penalty"] = penalty.detach()
        out.update({f"{case}/grad/{n}": p.grad.detach().clone() for n, p in net.named_parameters()})
    for case, kwargs, y in (("exact", dict(fisher_type="exact"), None),
                            ("gaussian", dict(likelihood="gaussian"), out["yg"])):
        ewc = natgrad.EWC(model(), 1.0, **kwargs)
        ewc.consolidate(out["x1"], y)
        out.update({f"{case}/fisher0/{n}": f for n, f in ewc.tasks[0]["diag"].items()})
    return out


def main() -> int:
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    torch.save(build(), PATH)
    print(f"wrote {os.path.normpath(PATH)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
