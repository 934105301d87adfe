#!/usr/bin/env bash
# One-command GPU check of natgrad, for a machine with an NVIDIA GPU (a few minutes; each step
# has a time limit, 8 minutes in all: build 240 s, tests 120 s, K-FAC 60 s, benchmark 60 s).
#
#   bash scripts/gpu_check.sh
#
# 1. Finds a Python whose torch is a CUDA build that sees a GPU: $NATGRAD_PYTHON, python3 or
#    python on PATH (a system-wide CUDA torch is used as it is, nothing is installed), .venv-gpu,
#    .venv. If none has one but nvidia-smi lists a GPU, it creates .venv-gpu the way
#    scripts/env.sh creates .venv (pip; needs the network). No GPU at all: exits 2, saying so.
# 2. Builds natgrad._C against that torch into build/gpu/pkg (a copy of python/natgrad), so the
#    in-place CPU build of python/natgrad is left alone.
# 3. Runs the per-device op tests (tests/python/ops/, test_package.py) with CUDA
#    required: the CUDA variants and torch.library.opcheck on CUDA must run, not skip.
# 4. Trains a small MLP on generated data with natgrad.KFAC on CPU and on CUDA from the same
#    initial parameters (float64 and float32, eigen and inverse forms) and compares the
#    parameters to a tolerance.
# 5. Runs the op benchmark on the GPU: benchmarks/ops.py --quick --device cuda.
# Results, named after the GPU, go to benchmarks/results/: gpu_check_<gpu>.json (the summary:
# device, torch, each check's status and time, pytest counts, the K-FAC comparison) and
# ops_cuda_<gpu>.json (the benchmark); the full log and pytest's JUnit XML go to build/gpu/.
# Exit status: 0 all checks passed, 1 a check failed, 2 no usable GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="$ROOT/benchmarks/results"
BUILD="$ROOT/build/gpu"
cd "$ROOT" || exit 1

log() { printf '\033[1m[gpu_check]\033[0m %s\n' "$*"; }
die() { log "ERROR: $*" >&2; exit "${2:-1}"; }

# ---- 1. a Python with a CUDA torch that sees a GPU -------------------------------------------
PROBE='import sys
try:
    import torch
except Exception as e:
    print(f"no torch ({type(e).__name__})"); sys.exit(1)
if not torch.version.cuda:
    print(f"torch {torch.__version__} is not a CUDA build"); sys.exit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"); sys.exit(1)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}")'

PY="" seen=()
probe_pythons() {
  local candidate path what
  for candidate in "${NATGRAD_PYTHON:-}" python3 python "$ROOT/.venv-gpu/bin/python" "$ROOT/.venv/bin/python"; do
    [ -n "$candidate" ] || continue
    path="$(command -v "$candidate" 2>/dev/null)" || continue
    what="$("$path" -c "$PROBE" 2>/dev/null)" && { PY="$path"; log "using $path: $what"; return 0; }
    seen+=("$path: ${what:-does not run}")
  done
  return 1
}

if ! probe_pythons; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    log "nvidia-smi lists a GPU but no Python here has a CUDA torch; creating .venv-gpu (pip)"
    (export NATGRAD_VENV="$ROOT/.venv-gpu"; source "$ROOT/scripts/env.sh" && install_python_env) \
      || die "could not create .venv-gpu with a CUDA torch (pip needs the network)"
    seen=()
    probe_pythons || die "no usable CUDA torch even in .venv-gpu: ${seen[*]}"
  else
    log "ERROR: no CUDA GPU is visible on this machine, so there is nothing to check." >&2
    log "  nvidia-smi: $(command -v nvidia-smi >/dev/null 2>&1 && (nvidia-smi -L 2>&1 | head -n 1) || echo 'not installed')" >&2
    for s in "${seen[@]}"; do log "  $s" >&2; done
    log "  Run this script on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 2
  fi
fi

GPU="$("$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))')"
STEM="$RESULTS/gpu_check_$GPU"
LOGS="$BUILD/gpu_check_$GPU"
mkdir -p "$RESULTS" "$BUILD"
exec > >(tee "$LOGS.log") 2>&1
log "GPU $GPU; results go to ${STEM#"$ROOT"/}.json, the log to ${LOGS#"$ROOT"/}.log"
"$PY" -c 'import pytest' 2>/dev/null || die "pytest is not installed for $PY (pip install pytest)"

declare -A STATUS SECONDS_TAKEN
run_step() {  # run_step NAME TIMEOUT_S COMMAND...: runs, times and records a check
  local name="$1" limit="$2" start rc
  shift 2
  log "---- $name (at most ${limit}s)"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  SECONDS_TAKEN[$name]=$(( $(date +%s) - start ))
  if [ "$rc" -eq 0 ]; then STATUS[$name]=passed; else STATUS[$name]="failed (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"; fi
  log "$name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s"
}

# ---- 2. build against this torch, outside the source tree -------------------------------------
build() {
  rm -rf "$BUILD/pkg" && mkdir -p "$BUILD/pkg" && cp -r "$ROOT/python/natgrad" "$BUILD/pkg/" \
    && rm -f "$BUILD"/pkg/natgrad/_C*.so \
    && find "$BUILD/pkg" -name __pycache__ -prune -exec rm -rf {} + \
    && PATH="$( [ -d /usr/lib/ccache ] && echo /usr/lib/ccache: )$PATH" MAX_JOBS="$(nproc)" \
       "$PY" setup.py build_ext --build-lib "$BUILD/pkg" --build-temp "$BUILD/temp" >"$BUILD/build.log" 2>&1 \
    || { tail -n 40 "$BUILD/build.log"; return 1; }
  PYTHONPATH="$BUILD/pkg" "$PY" -c 'import natgrad, torch; print("natgrad", natgrad.__version__, "from", natgrad.__file__); print(natgrad.build_info())'
}
export PY ROOT BUILD LOGS
export -f build
run_step build 240 bash -c build
[ "${STATUS[build]}" = passed ] || die "the build failed; see ${BUILD#"$ROOT"/}/build.log"
export PYTHONPATH="$BUILD/pkg" OMP_WAIT_POLICY=PASSIVE

# ---- 3. per-device op tests, CUDA required ---------------------------------------------------
run_step tests 120 env NATGRAD_REQUIRE_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider -o "pythonpath=$BUILD/pkg" \
  --junitxml="${LOGS}_pytest.xml" tests/python/ops tests/python/test_package.py

# ---- 4. K-FAC on CUDA against K-FAC on CPU ---------------------------------------------------
kfac_compare() {
  "$PY" - "$LOGS.kfac.json" <<'EOF'
"""natgrad.KFAC on CPU and CUDA from the same initial parameters and data: the parameters
after a few steps must agree to a tolerance set by the dtype."""
import json, sys, time

import torch
import torch.nn.functional as F

import natgrad

torch.manual_seed(0)
X = torch.randn(512, 32, dtype=torch.float64)
Y = (X @ torch.randn(32, 4, dtype=torch.float64) + 0.1 * torch.randn(512, 4, dtype=torch.float64)).argmax(1)
TOL = {torch.float64: 1e-8, torch.float32: 5e-3}  # max |cuda - cpu| / max |cpu| over parameters


def train(device, dtype, method, steps=12):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 4)).to(dtype)
    model.to(device)
    opt = natgrad.KFAC(model, lr=0.05, damping=1e-2, kl_clip=1e-2, factor_update_period=1,
                       inverse_update_period=3, inverse_method=method)
    x, y = X.to(device, dtype), Y.to(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return [p.detach().cpu().double() for p in model.parameters()], loss.item(), time.perf_counter() - start


results, ok = [], True
for dtype in (torch.float64, torch.float32):
    for method in ("eigen", "inverse"):
        cpu, loss_cpu, t_cpu = train(torch.device("cpu"), dtype, method)
        gpu, loss_gpu, t_gpu = train(torch.device("cuda"), dtype, method)
        scale = max(p.abs().max().item() for p in cpu)
        err = max((g - c).abs().max().item() for g, c in zip(gpu, cpu)) / scale
        passed = err <= TOL[dtype]
        ok &= passed
        results.append({"dtype": str(dtype), "inverse_method": method, "steps": 12,
                        "max_rel_param_diff": err, "tolerance": TOL[dtype], "passed": passed,
                        "loss_cpu": loss_cpu, "loss_cuda": loss_gpu,
                        "seconds_cpu": t_cpu, "seconds_cuda": t_gpu})
        print(f"KFAC {method:7s} {str(dtype):13s}: max rel param diff {err:.2e} (tol {TOL[dtype]:.0e}) "
              f"loss cpu {loss_cpu:.6f} cuda {loss_gpu:.6f}  {'ok' if passed else 'MISMATCH'}")
with open(sys.argv[1], "w") as f:
    json.dump({"device": torch.cuda.get_device_name(0), "runs": results}, f, indent=2)
sys.exit(0 if ok else 1)
EOF
}
export -f kfac_compare
run_step kfac_cuda_vs_cpu 60 bash -c kfac_compare

# ---- 5. op benchmark on the GPU --------------------------------------------------------------
run_step benchmark 60 "$PY" benchmarks/ops.py --quick --device cuda --out "$RESULTS/ops_cuda_$GPU.json"

# ---- summary ---------------------------------------------------------------------------------
failed=0
for step in build tests kfac_cuda_vs_cpu benchmark; do
  [ "${STATUS[$step]:-not run}" = passed ] || failed=1
done
STATUS_JSON="$(for s in build tests kfac_cuda_vs_cpu benchmark; do printf '%s\t%s\t%s\n' "$s" "${STATUS[$s]:-not run}" "${SECONDS_TAKEN[$s]:-0}"; done)"
STATUS_JSON="$STATUS_JSON" "$PY" - "$STEM.json" "$LOGS" "$RESULTS/ops_cuda_$GPU.json" <<'EOF'
import json, os, platform, sys, xml.etree.ElementTree as ET
from datetime import datetime, timezone

import torch

import natgrad

out, logs, bench = sys.argv[1], sys.argv[2], sys.argv[3]
steps = {}
for line in os.environ["STATUS_JSON"].splitlines():
    name, status, seconds = line.split("\t")
    steps[name] = {"status": status, "seconds": int(seconds)}
summary = {
    "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
    "python": platform.python_version(), "natgrad_build": natgrad.build_info(),
    "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "steps": steps,
}
try:
    suite = ET.parse(logs + "_pytest.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    summary["pytest"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, IndexError):
    summary["pytest"] = None
for key, path in (("kfac_cuda_vs_cpu", logs + ".kfac.json"), ("ops_benchmark", bench)):
    try:
        with open(path) as f:
            data = json.load(f)
        summary[key] = data["runs"] if key == "kfac_cuda_vs_cpu" else os.path.relpath(path)
    except (OSError, ValueError, KeyError):
        summary[key] = None
summary["log"] = os.path.relpath(logs + ".log")
with open(out, "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps({k: summary[k] for k in ("device", "torch", "steps", "pytest")}, indent=2))
EOF
if [ "$failed" -eq 0 ]; then log "all GPU checks passed on $GPU"; else log "some GPU checks FAILED on $GPU (see ${LOGS#"$ROOT"/}.log)"; fi
exit "$failed"
