#!/usr/bin/env bash
# natgrad's main job: the quick version of the time-to-target harness
# (benchmarks/time_to_target.py --quick). Every workload (Fashion-MNIST MLP, deep autoencoder,
# ResNet-8 CNN, char transformer on Debian's fortunes) and every optimizer (SGD-Nesterov, AdamW,
# Muon, SOAP, natgrad.KFAC; kfac-pytorch is reported as not installable) on budgets x0.12 with
# 2 trials each, then the best trial on 2 more seeds; prints the time-to-AdamW's-validation-target
# table and writes benchmarks/results/time_to_target_quick{.json,_*.png}. About 10 minutes on
# 2 cores after set-up. The full protocol (~2 h) is `python benchmarks/time_to_target.py`; the
# old training-loss comparison is `python benchmarks/train.py`.
# Does its own set-up on a fresh machine (see scripts/env.sh). Extra arguments go to the
# harness (e.g. scripts/main.sh --workloads cnn --trials 3).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
setup_all
cd "$NATGRAD_ROOT"
exec "$PY" benchmarks/time_to_target.py --quick "$@"
