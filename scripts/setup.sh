#!/usr/bin/env bash
# Set up .venv/ in the repo root with splitsense installed (editable) and everything it needs.
#   scripts/setup.sh          the runtime: models, edge, cloud and simulators (what `splitsense demo` needs),
#                             and the data package splitsense-assets (assets/: datasets, weights, catalogs)
#   scripts/setup.sh --dev    also the test, lint and codegen tools, and Debian's redis-server and prometheus
# Safe to rerun: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="sim"
services=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="dev"; services=1 ;;
    *) echo "usage: scripts/setup.sh [--dev]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned, so that the CPU wheel is used and nothing pulls the CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "==> installing torch 2.13.0 (CPU)"
  "${pip[@]}" torch==2.13.0
fi
echo "==> installing splitsense[$extras] and its data package (assets/)"
"${pip[@]}" -e ".[$extras]" -e ./assets
# A device installs less: `pip install ".[edge]"` (ONNX Runtime, no torch, no data); see README.

if [ "$services" = 1 ]; then
  missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v prometheus >/dev/null || [ -x /usr/bin/prometheus ] || missing+=(prometheus)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing Debian packages: ${missing[*]} (tests start them themselves)"
    sudo_cmd=()
    [ "$(id -u)" = 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
echo "==> ready: .venv/bin/splitsense"
