"""natgrad.KFAC's step time, two source trees side by side in one process (1 thread).

Usage::

    git worktree add /tmp/old <rev>        # or: git archive <rev> python | tar -x -C /tmp/old
    PYTHONPATH=python python benchmarks/kfac_step_ab_inprocess.py --old /tmp/old/python [--quick]

The old tree's ``natgrad`` is copied to a temporary package ``natgrad_old`` whose imports of
``natgrad._C`` and ``natgrad.ops`` are pointed at this tree's (one extension can register the
``natgrad`` ops only once; use it when the two trees' ``csrc/`` and ``ops/`` are the same). Both
optimizers then train copies of the same model on the same batches: after the warm-up their
parameters are compared (they must be bitwise equal for a refactoring), and each round times
``steps`` steps of one, then of the other (the order alternates), in CPU time. Reported: the
median and minimum per-step time of each and the ratio of the medians. Models: the digits MLP
64-256-256-10 and the digits CNN of ``kfac_step_ab.py`` (batch 128); methods eigen and inverse;
periods (factor, inverse) (1, 1), (1, 10), (10, 100). Writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
PERIODS = ((1, 1), (1, 10), (10, 100))


def old_package(old_python: str, into: str) -> None:
    """Copies ``old_python/natgrad`` to ``into/natgrad_old``, importing ``_C`` and ``ops`` from
    this tree's natgrad."""
    dst = Path(into) / "natgrad_old"
    shutil.copytree(Path(old_python) / "natgrad", dst, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.rmtree(dst / "ops")

    def from_import(m: re.Match) -> str:
        indent, names = m.group(1), [n.strip() for n in m.group(2).split(",")]
        keep = [n for n in names if n.split(" ")[0] in ("_C", "ops")]
        move = [n for n in names if n not in keep]
        out = [f"{indent}from natgrad import {', '.join(keep)}"] if keep else []
        return "\n".join(out + ([f"{indent}from natgrad_old import {', '.join(move)}"] if move else []))

    for f in dst.rglob("*.py"):
        s = f.read_text()
        s = re.sub(r"^([ \t]*)from natgrad import ([^\n(]+)$", from_import, s, flags=re.M)
        s = re.sub(r"\bfrom natgrad\.(?!ops\b|_C\b)", "from natgrad_old.", s)
        s = re.sub(r"^([ \t]*)import natgrad\.(?!ops\b)", r"\1import natgrad_old.", s, flags=re.M)
        f.write_text(s)


def build(kind: str):
    import torch.nn as nn
    if kind == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(32 * 4 * 4, 10))
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def main(argv: list[str] | None = None) -> int:
    """Runs every configuration, prints the table, writes the JSON; returns 0 (1 if a pair of
    runs did not agree bitwise)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="python/ directory of the baseline tree")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "kfac_step_ab_inprocess.json"))
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp()
    old_package(args.old, tmp)
    sys.path.insert(0, tmp)
    sys.path.insert(0, HERE)
    import torch
    import torch.nn.functional as F

    import natgrad
    import natgrad_old
    from data import load_digits
    torch.set_num_threads(1)
    data = load_digits()[0]
    rounds = args.rounds or (5 if args.quick else 15)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        idx = torch.randint(0, data.x.shape[0], (128,), generator=gen)
        batches.append((data.x[idx], data.y[idx]))
    hyper = dict(lr=0.1, momentum=0.9, damping=1e-3, kl_clip=1e-3, factor_decay=0.95)
    print(f"old: {args.old}; new: {natgrad.__file__}; CPU time, 1 thread; load {os.getloadavg()}")
    print(f"{'model':<8} {'method':<8} {'periods':<10} {'old ms':>8} {'new ms':>8} {'new/old':>8} "
          f"{'old min':>8} {'new min':>8} equal")
    rows, all_equal = [], True
    for kind in ("mlp", "cnn"):
        for method in ("eigen", "inverse"):
            for fp, ip in PERIODS:
                torch.manual_seed(0)
                models = {"old": build(kind)}
                models["new"] = copy.deepcopy(models["old"])
                opts = {name: lib.KFAC(models[name], inverse_method=method, factor_update_period=fp,
                                       inverse_update_period=ip, **hyper)
                        for name, lib in (("old", natgrad_old), ("new", natgrad))}
                steps = -(-max(10, ip) // ip) * ip
                position = {"old": 0, "new": 0}

                def train(name: str, n: int) -> None:
                    model, opt = models[name], opts[name]
                    for _ in range(n):
                        x, y = batches[position[name] % len(batches)]
                        position[name] += 1
                        opt.zero_grad(set_to_none=True)
                        F.cross_entropy(model(x), y).backward()
                        opt.step()

                for name in models:
                    train(name, max(30, steps))
                equal = all(torch.equal(a, b) for a, b in zip(models["old"].parameters(), models["new"].parameters()))
                all_equal &= equal
                times: dict[str, list[float]] = {"old": [], "new": []}
                for r in range(rounds):
                    for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                        start = time.process_time()
                        train(name, steps)
                        times[name].append((time.process_time() - start) / steps)
                med = {k: statistics.median(v) for k, v in times.items()}
                low = {k: min(v) for k, v in times.items()}
                rows.append({"model": kind, "method": method, "periods": [fp, ip], "steps": steps,
                             "rounds": rounds, "equal_after_warmup": equal, "times_s": times,
                             "median_s": med, "min_s": low, "ratio_new_over_old": med["new"] / med["old"]})
                print(f"{kind:<8} {method:<8} {str((fp, ip)):<10} {med['old'] * 1e3:8.2f} {med['new'] * 1e3:8.2f} "
                      f"{med['new'] / med['old']:8.3f} {low['old'] * 1e3:8.2f} {low['new'] * 1e3:8.2f} {equal}",
                      flush=True)
    ratios = [r["ratio_new_over_old"] for r in rows]
    print(f"geometric mean new/old: {statistics.geometric_mean(ratios):.3f}; all equal: {all_equal}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"old": args.old, "rounds": rounds, "loadavg_end": os.getloadavg(), "rows": rows}, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
