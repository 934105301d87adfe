"""Time to a validation target, AlgoPerf-style: SGD (Nesterov), AdamW, Muon, SOAP, kfac-pytorch
natgrad.KFAC and natgrad.EKFAC (eigenvalue_correction=True) on four CPU workloads, each tuned
with the same number of trials.

Usage::

    PYTHONPATH=python python benchmarks/time_to_target.py            # full protocol (~2 h, 2 cores)
    PYTHONPATH=python python benchmarks/time_to_target.py --quick    # the main job (~10 min)
    ... [--workloads fashion_mlp cnn] [--optimizers AdamW natgrad.KFAC] [--trials 6]
        [--budget-scale 1.0] [--out benchmarks/results]

Workloads (``benchmarks/ttt/workloads.py``): ``fashion_mlp`` (784-512-512-10 MLP, validation
cross entropy), ``autoencoder`` (deep Fashion-MNIST autoencoder, validation reconstruction
BCE), ``cnn`` (ResNet-8 with BatchNorm on 14x14 Fashion-MNIST, validation cross entropy and
accuracy) and ``char_lm`` (2-layer char transformer on Debian's fortunes, validation
nats/char). Each has a held-out validation split and a fixed budget of training CPU seconds.

Protocol (``benchmarks/ttt/protocol.py``):

* every optimizer gets ``--trials`` trials (default 6) from its own search space (log-uniform
  lr plus one or two key hyperparameters; ``benchmarks/ttt/optimizers.py``), drawn from a
  scrambled Halton sequence with a fixed seed, all with the same warmup+cosine schedule over
  the budget; trials run on seed 0 (weights and batches), optimizers alternating;
* the trial with the best validation metric within the budget is rerun on seeds 1 and 2;
* the target is AdamW's: the median over its 3 seeds of the best validation metric each
  reaches within the budget;
* the score is the median over the 3 seeds of the training CPU seconds at the first
  evaluation at or below the target (``not reached`` when fewer than 2 seeds reach it), with
  steps and samples to target, and the ratio to AdamW's median with the seeds' spread.

Clock: ``time.process_time()`` summed over the training steps (batch sampling, forward,
backward, optimizer step) -- CPU seconds of both torch threads; evaluation is off the clock;
the training wall-clock is recorded too. The lr schedule follows the same clock.

Writes ``<name>.json`` (every run's curve, the search spaces, the machine) and
``<name>_<workload>.png`` per workload plus ``<name>_summary.png`` to ``--out`` (default
benchmarks/results), where ``<name>`` is ``time_to_target`` (``time_to_target_quick`` with
``--quick``), and prints the table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

# Idle OpenMP workers sleep instead of spinning (see benchmarks/train.py): spinning threads
# would also bill process CPU time, the harness's clock. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import machine_info, write_payload  # noqa: E402
from ttt import optimizers as opt_mod  # noqa: E402
from ttt import protocol, report, workloads  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FULL = {"trials": 6, "budget_scale": 1.0, "evals": 20}
QUICK = {"trials": 2, "budget_scale": 0.12, "evals": 8}
EXTRA_SEEDS = (1, 2)
CLOCK = ("time.process_time(): CPU seconds of the process (all torch threads) summed over the "
         "training steps (batch sampling, forward, backward, optimizer step); evaluation excluded")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"the main job: {QUICK['trials']} trials, budgets x{QUICK['budget_scale']}, "
                        f"{QUICK['evals']} evaluations per run")
    p.add_argument("--workloads", nargs="+", choices=list(workloads.WORKLOADS), default=None)
    p.add_argument("--optimizers", nargs="+", choices=list(opt_mod.OPTIMIZERS), default=None,
                   help="default: all (AdamW is always run: it sets the target)")
    p.add_argument("--trials", type=int, default=None, help="trials per optimizer (6; quick: 2)")
    p.add_argument("--budget-scale", type=float, default=None, help="multiplies every budget (1; quick: 0.12)")
    p.add_argument("--evals", type=int, default=None, help="evaluations per run (20; quick: 8)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    p.add_argument("--name", default=None, help="file name stem (time_to_target[_quick])")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2)")
    p.add_argument("--smoke", action="store_true", help="tiny data subsets (tests only)")
    p.add_argument("--report", metavar="JSON", default=None,
                   help="run nothing: print the table (and a Markdown copy) of a results JSON")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    args.trials = args.trials if args.trials is not None else base["trials"]
    args.budget_scale = args.budget_scale if args.budget_scale is not None else base["budget_scale"]
    args.evals = args.evals if args.evals is not None else base["evals"]
    args.name = args.name or ("time_to_target_quick" if args.quick else "time_to_target")
    if args.trials < 1 or args.budget_scale <= 0 or args.evals < 1:
        p.error("--trials and --evals must be >= 1 and --budget-scale > 0")
    return args


def choose_optimizers(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(optimizers to run, {unavailable optimizer: reason}); AdamW always runs."""
    names = list(requested or opt_mod.OPTIMIZERS)
    if "AdamW" not in names:
        names.insert(0, "AdamW")
    names = [o for o in opt_mod.OPTIMIZERS if o in names]
    unavailable = {o: r for o in names if (r := opt_mod.unavailable_reason(o)) is not None}
    return [o for o in names if o not in unavailable], unavailable


def main(argv: list[str] | None = None) -> int:
    """Runs the protocol, prints the table, writes the JSON and PNGs."""
    args = parse_args(argv)
    if args.report:
        results = report.load(args.report)
        print(report.format_table(results) + "\n\n" + report.markdown_table(results))
        return 0
    torch.set_num_threads(args.threads)
    import tqdm as tqdm_mod
    tqdm_mod.tqdm.monitor_interval = 0  # no monitor thread billing CPU time

    names = args.workloads or list(workloads.WORKLOADS)
    optimizers, unavailable = choose_optimizers(args.optimizers)
    for o, why in unavailable.items():
        print(f"[time_to_target] {o}: not run: {why}")
    runs_per_opt = args.trials + len(EXTRA_SEEDS)
    start_wall, load_start = time.perf_counter(), list(os.getloadavg())
    results: dict[str, Any] = {
        "benchmark": "time_to_target", "quick": args.quick, "argv": sys.argv[1:] if argv is None else argv,
        "protocol": {"trials": args.trials, "extra_seeds": list(EXTRA_SEEDS), "budget_scale": args.budget_scale,
                     "evals_per_run": args.evals, "sampler": "scipy.stats.qmc.Halton(scramble=True, seed=0)",
                     "selection": "best validation metric within the budget, seed 0",
                     "target": "median over AdamW's 3 seeds of the best validation metric within the budget",
                     "score": "median over 3 seeds of the training CPU seconds at the first evaluation at or "
                              "below the target (inf: not reached)",
                     "clock": CLOCK, "threads": args.threads,
                     "divergence": f"metric not finite or > {protocol.DIVERGENCE_FACTOR:g}x its initial value: "
                                   "run stopped"},
        "optimizers": {o: opt_mod.spec(o) for o in optimizers + list(unavailable)},
        "unavailable": unavailable, "loadavg_start": load_start, "workloads": {}}
    json_path = os.path.join(args.out, f"{args.name}.json")
    built = {}
    from tqdm import tqdm

    # data first (seconds), so that the bar's total is known
    for n in names:
        built[n] = workloads.build(n, smoke=args.smoke)
    total = sum(w.budget_s * args.budget_scale for w in built.values()) * runs_per_opt * len(optimizers)
    print(f"[time_to_target] {len(names)} workloads x {len(optimizers)} optimizers x {runs_per_opt} runs "
          f"({args.trials} trials + {len(EXTRA_SEEDS)} seeds), {total:.0f} training CPU s in all; "
          f"{args.threads} threads; load average {load_start[0]:.2f}")
    with tqdm(total=round(total, 1), unit="cpu-s", desc="time to target", dynamic_ncols=True, mininterval=1.0,
              bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} cpu-s [{elapsed}<{remaining}] {postfix}") as bar:
        for n in names:
            w = built[n]
            budget = w.budget_s * args.budget_scale
            skipped = {o: r for o in optimizers if (r := opt_mod.workload_reason(o, w.likelihood)) is not None}
            for o, why in skipped.items():
                print(f"[time_to_target] {o} on {n}: not run: {why}")
            summary = protocol.run_workload(
                w, [o for o in optimizers if o not in skipped], args.trials, EXTRA_SEEDS, budget, args.evals,
                on_run=lambda s: bar.set_postfix_str(s, refresh=False),
                on_progress=lambda s: bar.update(min(round(s, 3), max(bar.total - bar.n, 0))))
            results["workloads"][n] = {"describe": w.describe, "budget_s": budget, "batch_size": w.batch_size,
                                       "evals": args.evals, "not_run": skipped, **summary}
            results.update(machine=machine_info(), wall_time_s=time.perf_counter() - start_wall)
            write_payload(json_path, results)
            report.plot_workload(n, results["workloads"][n], os.path.join(args.out, f"{args.name}_{n}.png"))
    summary_png = os.path.join(args.out, f"{args.name}_summary.png")
    report.plot_summary(results, summary_png)
    results.update(machine=machine_info(), wall_time_s=time.perf_counter() - start_wall,
                   process_cpu_s=time.process_time(), loadavg_end=list(os.getloadavg()))
    write_payload(json_path, results)
    print(f"\nTime to AdamW's validation target ({'quick' if args.quick else 'full'} protocol: "
          f"{args.trials} trials per optimizer on seed 0, best rerun on seeds {list(EXTRA_SEEDS)}; budgets x"
          f"{args.budget_scale:g}; clock: training CPU seconds, evaluation excluded; {args.threads} threads; "
          f"wall {results['wall_time_s']:.0f} s, process CPU {results['process_cpu_s']:.0f} s; load average "
          f"{load_start[0]:.2f} -> {results['loadavg_end'][0]:.2f})\n")
    print(report.format_table(results))
    print(f"\nwrote {json_path}, {summary_png} and {args.name}_<workload>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
