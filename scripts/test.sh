#!/usr/bin/env bash
# Set everything up, then run the checks CI runs: generated-code drift, ruff, mypy, pytest.
#   scripts/test.sh              all tests (unit + integration with real Ray, Redis, Prometheus)
#   scripts/test.sh -m "not integration"   any extra arguments go to pytest (one run, in order)
# With no arguments, mypy runs beside the unit tests (one core each), then the integration tests
# run alone: they time real servers and should not share the cores with a type checker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev

echo "==> generated wire code matches proto/"
bash scripts/check_proto.sh
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

MYPY=(.venv/bin/mypy splitsense pipelines edge cloud simulators benchmarks)
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)

# pytest's exit code, where 5 (it collected no tests) is a failure here
run_pytest() {
  set +e
  "${PYTEST[@]}" "$@"
  local rc=$?
  set -e
  if [ "$rc" = 5 ]; then
    echo "pytest collected no tests ($*): that is a failure here" >&2
    return 1
  fi
  return "$rc"
}

if [ "$#" -gt 0 ]; then
  echo "==> mypy"
  "${MYPY[@]}"
  echo "==> pytest $*"
  run_pytest "$@"
  exit $?
fi

mypy_log=$(mktemp)
trap 'rm -f "$mypy_log"' EXIT
echo "==> mypy (beside the unit tests; its output follows them)"
"${MYPY[@]}" > "$mypy_log" 2>&1 &
mypy_pid=$!
echo "==> pytest tests/unit"
unit_rc=0
run_pytest tests/unit || unit_rc=$?
mypy_rc=0
wait "$mypy_pid" || mypy_rc=$?
echo "==> mypy"
cat "$mypy_log"
if [ "$unit_rc" != 0 ] || [ "$mypy_rc" != 0 ]; then
  echo "unit tests (exit $unit_rc) or mypy (exit $mypy_rc) failed: the integration tests are not run" >&2
  exit 1
fi
echo "==> pytest tests/integration"
run_pytest tests/integration
