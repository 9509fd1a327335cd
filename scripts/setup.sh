#!/usr/bin/env bash
# Set up .venv/ in the repo root with splitsense installed (editable) and everything it needs.
#   scripts/setup.sh          the runtime: models, edge, cloud and simulators (what `splitsense demo` needs),
#                             and the data package splitsense-assets (assets/: datasets, weights, catalogs);
#                             exports the fronts to ONNX once (`splitsense models export`) for the demo's devices
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
# --no-compile: no bytecode for every file of torch and ray up front (~50 s of set-up here); Python
# compiles what it imports, once
pip=(.venv/bin/python -m pip install --quiet --no-compile --disable-pip-version-check)
# torch first, pinned, so that the CPU wheel is used and nothing pulls the CUDA build.
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "==> installing torch 2.13.0 (CPU)"
  "${pip[@]}" torch==2.13.0
fi
echo "==> installing splitsense[$extras] and its data package (assets/)"
# -c: the ONNX Runtime the devices run (deploy/edge/constraints.txt), so that exports are checked on it
"${pip[@]}" -c deploy/edge/constraints.txt -e ".[$extras]" -e ./assets
# A device installs less: `pip install -c deploy/edge/constraints.txt ".[edge]"` (ONNX Runtime, no
# torch, no data); see README.

if [ "$services" = 0 ]; then
  # The demo's devices run their fronts on ONNX Runtime (edge.backend auto) when every model has
  # an export; the exports are build outputs (git-ignored), made once here. The tests make their own.
  unexported=()
  for catalog in assets/splitsense_assets/weights/*.catalog.json; do
    model=$(basename "$catalog" .catalog.json)
    [ -f "assets/splitsense_assets/weights/export/$model/manifest.json" ] || unexported+=("$model")
  done
  if [ ${#unexported[@]} -gt 0 ]; then
    echo "==> exporting the fronts to ONNX (${unexported[*]}; once, ~1 min a model): splitsense models export"
    for model in "${unexported[@]}"; do .venv/bin/splitsense models export --model "$model"; done
  fi
fi

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
