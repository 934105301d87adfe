"""Time to a validation target, AlgoPerf-style (benchmarks/time_to_target.py is the entry point).

Modules: :mod:`.workloads` (data, models, metrics, budgets), :mod:`.optimizers` (optimizers,
search spaces, trial sampler, schedule), :mod:`.protocol` (runs, tuning, target, scores) and
:mod:`.report` (table and plots).
"""
