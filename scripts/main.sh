#!/usr/bin/env bash
# natgrad's main job: benchmarks every C++ op against the plain PyTorch composition a user
# would otherwise write, prints the table and writes benchmarks/results/ops_cpu.json.
# Does its own set-up on a fresh machine (see scripts/env.sh). Extra arguments go to the
# benchmark (e.g. scripts/main.sh --quick).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
setup_all
cd "$NATGRAD_ROOT"
exec "$PY" benchmarks/ops.py "$@"
