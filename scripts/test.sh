#!/usr/bin/env bash
# Set everything up, then run the checks CI runs: generated-code drift, ruff, mypy, pytest.
#   scripts/test.sh              all tests (unit + integration with real Ray, Redis, Prometheus)
#   scripts/test.sh -m "not integration"   any extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev

echo "==> generated wire code matches proto/"
bash scripts/check_proto.sh
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy splitsense pipelines edge cloud simulators benchmarks
echo "==> pytest"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
