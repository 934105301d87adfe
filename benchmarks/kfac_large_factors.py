"""Step time of natgrad.KFAC on a ResNet-18 at 32×32 inputs, with and without ``max_factor_dim``.

Usage::

    PYTHONPATH=python python benchmarks/kfac_large_factors.py [--steps 5] [--limits none,4096,default,1024,512]
        [--threads 1] [--out FILE]

The model is timm's / torchvision's ``resnet18`` written in plain torch (BasicBlock, 7×7 stride-2
stem and max-pool, widths 64-128-256-512, 10 classes). At 32×32 inputs layer4 sees a 1×1 map,
and its 3×3 convolutions have 4608×4608 activation factors (512·3·3) of rank at most the batch
(32) per update: decomposing them whole dominates the first step and the per-step GEMMs.

For AdamW (lr 1e-3) and natgrad.KFAC (defaults: eigen, inverse period 10) with each
``max_factor_dim`` in ``--limits`` ("none": never split; "default": the option's default), one
process, the same batch (32 random images, seed 0) and model initialisation: the wall time of the
first step (forward, backward, optimizer step — for K-FAC its first decomposition of every
factor) and the mean of the next ``--steps`` steps (no refresh among them), as wall time and as
the process's CPU time (at one thread the CPU time is the work done, and stays comparable when
other jobs share the machine; the wall time does not), their ratios to AdamW's, the
fallback-ladder rungs K-FAC reported and the layers it split.

What the split costs in accuracy: after the ``max_factor_dim=None`` run, for every layer with a
side above 512, the relative error ``‖P_L g − P g‖ / ‖P g‖`` of the block-diagonal direction at
each limit L against the whole-factor K-FAC direction, on that layer's factors and gradient
(eigen, exact damping 1e-3, float64). Writes ``benchmarks/results/kfac_large_factors.json``.
Report the machine load with the numbers.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import format_rows, machine_info, write_payload  # noqa: E402
from ttt.workloads import BasicBlock  # noqa: E402  (the harness's ResNet block)

import natgrad  # noqa: E402
from natgrad.curvature import split  # noqa: E402
from natgrad.curvature.kron import KroneckerBlock  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kfac_large_factors.json")
DEFAULT_LIMIT = inspect.signature(natgrad.KFAC).parameters["max_factor_dim"].default


def resnet18(classes: int = 10) -> nn.Sequential:
    """ResNet-18 (He et al., 2016) as timm / torchvision build it, in plain torch."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def run(name: str, make_opt, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[dict, object]:
    """Wall and CPU time of the first step and the mean of the next ``steps`` of one optimizer on
    a fresh model; returns the row and the optimizer.
    """
    torch.manual_seed(0)
    model = resnet18()
    opt = make_opt(model)
    wall, cpu, losses = [], [], []
    for _ in range(steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        losses.append(loss.item())
        print(f"  {name}: step {len(wall)} wall {wall[-1]:.2f} s, cpu {cpu[-1]:.2f} s, loss {losses[-1]:.4f}",
              flush=True)
    row = {"name": name, "first_s": wall[0], "next_mean_s": sum(wall[1:]) / max(steps, 1), "next_s": wall[1:],
           "first_cpu_s": cpu[0], "next_mean_cpu_s": sum(cpu[1:]) / max(steps, 1), "next_cpu_s": cpu[1:],
           "losses": losses}
    if isinstance(opt, natgrad.KFAC):
        row["ladder"] = dict(opt.estimator.ledger.ladder)
        row["split"] = sorted({line.split()[0].rsplit(".", 1)[0] for line in opt.describe().splitlines()
                               if "block-diagonal" in line})
    return row, opt


def direction_errors(opt: natgrad.KFAC, limits: list[int], damping: float = 1e-3) -> dict[str, dict[str, float]]:
    """Per layer with a side above the smallest limit: ``‖P_L g − P g‖ / ‖P g‖`` of the
    block-diagonal K-FAC direction at each limit against the whole-factor one (eigen, exact
    damping), on the layer's current factors and gradient (float64; zero rows deflated, which is
    exact, so the whole factors decompose quickly).
    """
    out: dict[str, dict[str, float]] = {}
    for block in opt.estimator.blocks:
        if not isinstance(block, KroneckerBlock) or max(block.a_dim(), block.g_dim()) <= min(limits):
            continue
        a, g = block.state["A"].double(), block.state["G"].double()
        grad = block.pack([p.grad for p in block.params]).double()

        def direction(limit):
            a_ranges = split.factor_ranges(a.shape[0], limit, block.a_unit(), int(block.bias is not None))
            g_ranges = split.factor_ranges(g.shape[0], limit)
            state = dict(zip(("a_eigenvalues", "a_eigenvectors"), split.eigh_blocks(a, a_ranges)[:2]))
            state.update(zip(("g_eigenvalues", "g_eigenvectors"), split.eigh_blocks(g, g_ranges)[:2]))
            return split.precondition_tiles(grad, state, g_ranges, a_ranges, damping, False)

        exact = direction(None)
        out[block.name] = {str(limit): float((direction(limit) - exact).norm() / exact.norm()) for limit in limits}
        print(f"  {block.name}: A {a.shape[0]}, G {g.shape[0]}: {out[block.name]}", flush=True)
    return out


def main() -> None:
    """Runs the comparison and writes the table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first (default: 5)")
    parser.add_argument("--limits", default="none,4096,default,1024,512", help="max_factor_dim values, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--errors", action=argparse.BooleanOptionalAction, default=True,
                        help="after the max_factor_dim=None run, each split layer's direction error per limit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    rows = [run("AdamW", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), x, y, args.steps)[0]]
    errors = {}
    limits = [None if t == "none" else DEFAULT_LIMIT if t == "default" else int(t) for t in args.limits.split(",")]
    for text, limit in zip(args.limits.split(","), limits):
        label = f"KFAC max_factor_dim={limit}" + (" (default)" if text == "default" else "")
        row, opt = run(label, lambda m, limit=limit: natgrad.KFAC(m, max_factor_dim=limit), x, y, args.steps)
        row["max_factor_dim"] = limit
        rows.append(row)
        if limit is None and args.errors:
            errors = direction_errors(opt, sorted({v for v in limits if v is not None} | {512, 1024, 2048}))
    base = rows[0]
    for r in rows:
        for key in ("first_s", "next_mean_s", "first_cpu_s", "next_mean_cpu_s"):
            r[key.replace("_s", "_ratio")] = r[key] / base[key]
    table = format_rows(
        ["optimizer", "first step s (cpu)", "x AdamW (cpu)", f"next {args.steps} mean s (cpu)", "x AdamW (cpu)",
         "ladder rungs"],
        [[r["name"], f"{r['first_s']:.2f} ({r['first_cpu_s']:.2f})",
          f"{r['first_ratio']:.1f} ({r['first_cpu_ratio']:.1f})",
          f"{r['next_mean_s']:.3f} ({r['next_mean_cpu_s']:.3f})",
          f"{r['next_mean_ratio']:.1f} ({r['next_mean_cpu_ratio']:.1f})", str(r.get("ladder", "")) or "-"]
         for r in rows])
    print(table)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    write_payload(args.out, {"benchmark": "kfac_large_factors", "model": "resnet18 (BasicBlock), 32x32, batch 32",
                             "threads": args.threads, "steps": args.steps, "loadavg_at_end": load,
                             "machine": machine_info(), "rows": rows, "direction_errors": errors, "table": table})


if __name__ == "__main__":
    main()
