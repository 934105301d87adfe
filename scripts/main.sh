#!/usr/bin/env bash
# natgrad's main job: a real training comparison of SGD, Adam and natgrad.KFAC (best lr of a
# small grid, 3 seeds) on an MLP classifier (scikit-learn's digits) and a deep autoencoder
# (Fashion-MNIST from Debian's dataset-fashion-mnist): a progress bar, a table, and
# benchmarks/results/train.{json,png}. The op benchmark is `benchmarks/ops.py`.
# Does its own set-up on a fresh machine (see scripts/env.sh). Extra arguments go to the
# benchmark (e.g. scripts/main.sh --quick).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
setup_all
cd "$NATGRAD_ROOT"
exec "$PY" benchmarks/train.py "$@"
