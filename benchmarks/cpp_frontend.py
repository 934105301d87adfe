"""The C++ frontend's K-FAC step beside the Python natgrad.KFAC step and the bare-ATen floor.

Usage::

    source scripts/env.sh && build_cpp_tests     # builds build/cmake/benchmarks/cpp/kfac_frontend_bench
    "$PY" benchmarks/cpp_frontend.py [--quick]

Models (real data, ``benchmarks/data.py``): the digits MLP 64-256-256-10 and the Fashion-MNIST
MLP 784-512-512-10, batch 128, float32, 1 thread, the eigen method, periods (factor, inverse)
(1, 1), (1, 10), (10, 100); the hyperparameters of ``benchmarks/kfac_step_ab.py`` (lr 0.1,
momentum 0.9, damping 1e-3, kl_clip 1e-3, factor decay 0.95).

Protocol, one run: this process builds the model (``kfac_step_ab._build``, seed 0) and 8
minibatches, writes both to a temporary file (``torch.save``, read by ``torch::pickle_load``) and
starts ``build/cmake/benchmarks/cpp/kfac_frontend_bench`` (built by CMake with the examples),
which builds the same model from ``natgrad::nn::Linear`` layers with ``natgrad::optim::KFAC``
and answers timing commands on stdin. Both optimizers are warmed ``--warm`` steps at periods
(1, 10) on the same batches. Then, per periods, ``reps`` interleaved rounds time: the C++ step
(in the other process), the Python step, SGD on a copy of the model and the floor's bare ATen
calls (``kfac_step_ab._floor_ops``, imported, not copied); each quantity's minimum over the rounds
is kept (load spikes only add time). The floor of a configuration is SGD's step + the
preconditioning GEMMs + the factor GEMMs / factor period + the decompositions / inverse period
(design.md; the composition of ``kfac_step_ab.worker``). The floor's SGD step is Python's; the
last column puts the C++ step against the same floor with SGD's step timed in C++ (its
``torch::optim::SGD`` on a copy of the model), free of Python overhead on both sides.
Times are CPU seconds of each process
(``--clock wall`` switches). The table shows each step over the floor and the share of the
Python step that is Python overhead, ``(Python − C++) / Python`` (both run the same ops).

Writes ``benchmarks/results/cpp_frontend.json`` (``cpp_frontend_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import kfac_step_ab as ab  # noqa: E402  (the floor and the models, shared with the A/B benchmark)
from _harness import machine_info, write_payload  # noqa: E402
from data import load_digits, load_fashion_mnist  # noqa: E402

MODELS = ("digits_mlp", "fmnist_mlp")
DEFAULT_BINARY = os.path.join(ROOT, "build", "cmake", "benchmarks", "cpp", "kfac_frontend_bench")
FULL = {"warm": 100, "min_steps": 20, "reps": 3}
QUICK = {"warm": 20, "min_steps": 10, "reps": 2}


class CppStep:
    """The C++ bench process: warm-up and timing commands over pipes."""

    def __init__(self, binary: str, data_path: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.proc = subprocess.Popen([binary, "--data", data_path, "--method", "eigen", "--threads", "1"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer or answer.startswith("error"):
            raise RuntimeError(f"kfac_frontend_bench: {command!r} -> {answer!r} (exit {self.proc.poll()})")
        return answer

    def time(self, fp: int, ip: int, steps: int) -> tuple[float, float]:
        """(wall, cpu) seconds of ``steps`` steps at periods (fp, ip)."""
        wall, cpu = self.ask(f"time {fp} {ip} {steps}").split()
        return float(wall), float(cpu)

    def sgd(self, steps: int) -> tuple[float, float]:
        """(wall, cpu) seconds of ``steps`` torch::optim::SGD steps on a copy of the model."""
        wall, cpu = self.ask(f"sgd {steps}").split()
        return float(wall), float(cpu)

    def close(self) -> None:
        """Ends the process (asks it to quit; kills it if it does not)."""
        if self.proc.poll() is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def run_model(name: str, cfg: dict, binary: str, clock: int) -> list[dict]:
    """Every periods row of one model."""
    import natgrad

    spec = ab.MODELS[name]
    split = load_digits()[0] if spec["data"] == "digits" else load_fashion_mnist(train_size=10000, test_size=10)[0]
    torch.manual_seed(0)
    model = ab._build(spec)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        idx = torch.randint(0, split.x.shape[0], (spec["batch"],), generator=gen)
        batches.append((split.x[idx].contiguous(), split.y[idx].contiguous()))
    payload = {"widths": torch.tensor(spec["widths"], dtype=torch.int64),
               **{f"params/{n}": p.detach().clone() for n, p in model.named_parameters()},
               **{f"x/{i}": x for i, (x, _) in enumerate(batches)}, **{f"y/{i}": y for i, (_, y) in enumerate(batches)},
               **{k: torch.tensor(float(ab.HYPER[k]), dtype=torch.float64) for k in ab.HYPER}}

    def loss_fn(out, x, y):
        return F.cross_entropy(out, y)

    opt = natgrad.KFAC(model, lr=ab.HYPER["lr"], momentum=ab.HYPER["momentum"], damping=ab.HYPER["damping"],
                       kl_clip=ab.HYPER["kl_clip"], factor_decay=ab.HYPER["factor_decay"], factor_update_period=1,
                       inverse_update_period=10, inverse_method="eigen")
    position = {"py": 0, "sgd": 0}

    def train(m, o, steps, key):  # the loop of kfac_step_ab.worker
        for _ in range(steps):
            x, y = batches[position[key] % len(batches)]
            position[key] += 1
            o.zero_grad(set_to_none=True)
            loss_fn(m(x), x, y).backward()
            o.step()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "bench.pt")
        torch.save(payload, data_path)
        cpp = CppStep(binary, data_path)
        try:
            cpp.ask(f"warm {cfg['warm']}")
            train(model, opt, cfg["warm"], "py")
            sgd_model = copy.deepcopy(model)
            sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)
            for fp, ip in ab.PERIODS:
                precondition, factors, decompose = ab._floor_ops(model, batches[0][0], "eigen", loss_fn)
                opt.factor_update_period, opt.inverse_update_period = fp, ip
                steps = -(-max(cfg["min_steps"], ip) // ip) * ip
                cpp.time(fp, ip, 3)
                cpp.sgd(3)
                train(model, opt, 3, "py")
                train(sgd_model, sgd, 3, "sgd")
                times = {k: [] for k in ("cpp", "python", "sgd", "cpp_sgd", "precondition", "factors", "decompose")}
                for _ in range(cfg["reps"]):  # interleaved, so that load spikes hit all alike
                    times["cpp"].append(cpp.time(fp, ip, steps))
                    times["python"].append(ab._timed(lambda: train(model, opt, steps, "py"), 1, warm=False))
                    times["sgd"].append(ab._timed(lambda: train(sgd_model, sgd, steps, "sgd"), 1, warm=False))
                    times["cpp_sgd"].append(cpp.sgd(steps))
                    times["precondition"].append(ab._timed(precondition, 10))
                    times["factors"].append(ab._timed(factors, 5))
                    times["decompose"].append(ab._timed(decompose, 1))
                best = {k: min(t[clock] for t in v) for k, v in times.items()}
                for k in ("cpp", "python", "sgd", "cpp_sgd"):
                    best[k] /= steps
                ops = best["precondition"] + best["factors"] / fp + best["decompose"] / ip
                floor, cpp_floor = best["sgd"] + ops, best["cpp_sgd"] + ops
                row = {"model": name, "periods": [fp, ip], "steps": steps, **{f"{k}_s": v for k, v in best.items()},
                       "floor_s": floor, "cpp_over_floor": best["cpp"] / floor,
                       "cpp_floor_s": cpp_floor, "cpp_over_cpp_floor": best["cpp"] / cpp_floor,
                       "python_over_floor": best["python"] / floor,
                       "python_overhead_share": (best["python"] - best["cpp"]) / best["python"],
                       "raw": times}
                rows.append(row)
                print(f"{name:<11} {str((fp, ip)):<9} {best['cpp'] * 1e3:8.2f} {best['python'] * 1e3:9.2f} "
                      f"{floor * 1e3:8.2f} {row['cpp_over_floor']:9.2f} {row['python_over_floor']:9.2f} "
                      f"{100 * row['python_overhead_share']:9.1f}% {row['cpp_over_cpp_floor']:12.2f}", flush=True)
        finally:
            cpp.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Runs every model, prints the table, writes the JSON; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short warm-up, fewer steps and rounds")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--binary", default=DEFAULT_BINARY, help="the kfac_frontend_bench program")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not os.path.exists(args.binary):
        print(f"{args.binary} not found: build it first (source scripts/env.sh && build_cpp_tests)", file=sys.stderr)
        return 2
    cfg = dict(QUICK if args.quick else FULL)
    if args.reps is not None:
        cfg["reps"] = args.reps
    warnings.filterwarnings("ignore", message="natgrad.KFAC")
    torch.set_num_threads(1)
    clock = 1 if args.clock == "cpu" else 0
    print(f"C++ frontend vs Python natgrad.KFAC vs floor: batch 128, 1 thread, eigen, {args.clock} time; "
          f"load average {os.getloadavg()}")
    print(f"{'model':<11} {'periods':<9} {'C++ ms':>8} {'Python ms':>9} {'floor ms':>8} {'C++/floor':>9} "
          f"{'Py/floor':>9} {'Py overhead':>10} {'C++/C++floor':>12}")
    start = time.perf_counter()
    rows = []
    for name in args.models:
        rows += run_model(name, cfg, args.binary, clock)
    worst = max(r["cpp_over_floor"] for r in rows)
    worst_cpp = max(r["cpp_over_cpp_floor"] for r in rows)
    print(f"\nworst C++/floor: {worst:.2f}, against the floor with SGD timed in C++: {worst_cpp:.2f} "
          f"(goal: <= 1.05 at every period); load average {os.getloadavg()}; "
          f"{time.perf_counter() - start:.0f} s")
    out = args.out or os.path.join(HERE, "results", "cpp_frontend_quick.json" if args.quick else "cpp_frontend.json")
    write_payload(out, {"machine": machine_info(), "clock": args.clock, "config": cfg, "hyper": ab.HYPER,
                        "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
