#!/usr/bin/env bash
# The project's test command (README and CI run exactly this): the default suite on all cores.
set -uo pipefail
cd "$(dirname "$0")/.."
# One thread per worker: two torch threads per process on a 2-core machine run several times slower.
OMP_NUM_THREADS=1 .venv/bin/pytest -n "${GRAPHPRUNE_TEST_WORKERS:-2}" -m "not slow" "$@"
status=$?
# pytest exits 5 when it collects no test: say so loudly, but it is not a failing test.
if [ "$status" = 5 ]; then echo "warning: pytest collected no tests" >&2; exit 0; fi
exit "$status"
