#!/usr/bin/env bash
# Runs every natgrad check: lint (ruff, mypy on python/natgrad; configured in pyproject.toml), the
# documentation build (mkdocs build --strict into build/docs: a warning fails it), the GoogleTest
# suite (ctest) and the pytest suite (which also runs every Python example of README.md and
# docs/, and checks the built site's API reference). A failing lint or docs build counts as a
# failing test.
# Does its own set-up on a fresh machine (see scripts/env.sh); repeated runs reuse the builds.
# Extra arguments go to pytest (e.g. scripts/test.sh -k woodbury).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
setup_all
build_cpp_tests

status=0
log "lint (ruff check python/natgrad, mypy)"
(cd "$NATGRAD_ROOT" && "$PY" -m ruff check python/natgrad) || status=1
(cd "$NATGRAD_ROOT" && "$PY" -m mypy) || status=1
log "docs (mkdocs build --strict -d build/docs)"
docs_site="$NATGRAD_ROOT/build/docs"
if (cd "$NATGRAD_ROOT" && NO_MKDOCS_2_WARNING=1 PYTHONPATH=python "$PY" -m mkdocs build --strict \
      -d "$docs_site"); then
  export NATGRAD_DOCS_SITE="$docs_site"
else
  status=1
fi
log "C++ tests (ctest)"
ctest --test-dir "$NATGRAD_ROOT/build/cmake" --output-on-failure -j "$NATGRAD_JOBS" || status=1
log "Python tests (pytest)"
(cd "$NATGRAD_ROOT" && "$PY" -m pytest -p no:cacheprovider "$@") || status=1
[ "$status" -eq 0 ] && log "all tests passed" || log "some tests FAILED"
exit "$status"
