# Idempotent set-up shared by scripts/test.sh and scripts/main.sh; source it, don't run it.
#
# On a fresh machine it installs Debian's libgtest-dev, ccache and cmake, creates .venv with
# torch 2.13.0 and the dev, peer and client requirements, and builds natgrad._C in place. On later runs every
# step finds its work done (stamps, ninja, ccache) and costs seconds.
# Environment: NATGRAD_VENV (default: <repo>/.venv), NATGRAD_JOBS (default: 2).

set -euo pipefail
NATGRAD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NATGRAD_VENV="${NATGRAD_VENV:-$NATGRAD_ROOT/.venv}"
NATGRAD_JOBS="${NATGRAD_JOBS:-2}"
PY="$NATGRAD_VENV/bin/python"
# Relative paths in ccache keys: a fresh clone (as CI makes) reuses objects built in another.
# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with other processes,
# spinning made steps up to 50x slower (seen in benchmarks/train.py).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# natgrad is built in place (python/natgrad/_C*.so): scripts import it from the source tree.
export PYTHONPATH="$NATGRAD_ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$NATGRAD_ROOT}" CCACHE_NOHASHDIR="${CCACHE_NOHASHDIR:-true}"

log() { printf '\033[1m[natgrad]\033[0m %s\n' "$*"; }

install_system_packages() {
  local missing=()
  for pkg in libgtest-dev ccache cmake g++ dataset-fashion-mnist fortunes; do  # fortunes: benchmarks/char_lm.py
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_python_env() {
  if [ ! -x "$PY" ]; then
    log "creating virtual environment $NATGRAD_VENV"
    python3 -m venv "$NATGRAD_VENV"
  fi
  local stamp="$NATGRAD_VENV/.natgrad-requirements"
  local reqs=("$NATGRAD_ROOT"/requirements-{dev,peers,clients}.txt)
  if ! cat "${reqs[@]}" | cmp -s - "$stamp"; then
    log "installing Python requirements (torch==2.13.0, pytest, peers, client libraries, ...)"
    "$PY" -m pip install -q --upgrade pip >/dev/null
    "$PY" -m pip install -q -r "$NATGRAD_ROOT/requirements-dev.txt"
    "$PY" -m pip install -q --no-deps -r "$NATGRAD_ROOT/requirements-peers.txt"
    "$PY" -m pip install -q --no-deps -r "$NATGRAD_ROOT/requirements-clients.txt"
    "$PY" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
    cat "${reqs[@]}" >"$stamp"
  fi
}

# torchvision's PyPI wheel cannot load its compiled ops beside the CPU torch wheel: a start-up hook
# in the venv lets its Python modules import (scripts/startup_hooks/natgrad_torchvision_schemas.py says why).
install_torchvision_schemas() {
  local site
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cmp -s "$NATGRAD_ROOT/scripts/startup_hooks/natgrad_torchvision_schemas.py" "$site/natgrad_torchvision_schemas.py" \
    || cp "$NATGRAD_ROOT/scripts/startup_hooks/natgrad_torchvision_schemas.py" "$site/"
  echo "import natgrad_torchvision_schemas" >"$site/natgrad_torchvision_schemas.pth"
}

# ccache's compiler links come first on PATH, so both builds hit the same cache.
with_ccache() { PATH="/usr/lib/ccache:$NATGRAD_VENV/bin:$PATH" "$@"; }

build_python_extension() {
  log "building natgrad._C (setup.py build_ext --inplace; incremental)"
  local logfile="$NATGRAD_ROOT/build/setup-build.log"
  mkdir -p "$NATGRAD_ROOT/build"
  if ! (cd "$NATGRAD_ROOT" && with_ccache env MAX_JOBS="$NATGRAD_JOBS" "$PY" setup.py build_ext --inplace >"$logfile" 2>&1); then
    tail -n 60 "$logfile"
    log "building natgrad._C failed; full log: $logfile"
    return 1
  fi
}

build_cpp_tests() {
  log "building libnatgrad and the GoogleTest suite (CMake; incremental)"
  local prefix
  prefix="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
  with_ccache cmake -S "$NATGRAD_ROOT" -B "$NATGRAD_ROOT/build/cmake" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
    -DCMAKE_MAKE_PROGRAM="$NATGRAD_VENV/bin/ninja" >"$NATGRAD_ROOT/build/cmake-configure.log" 2>&1 \
    || { tail -n 40 "$NATGRAD_ROOT/build/cmake-configure.log"; return 1; }
  with_ccache cmake --build "$NATGRAD_ROOT/build/cmake" -j "$NATGRAD_JOBS"
}

setup_all() {
  install_system_packages
  install_python_env
  install_torchvision_schemas
  build_python_extension
}
