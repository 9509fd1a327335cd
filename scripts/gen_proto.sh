#!/usr/bin/env bash
# Regenerates the Python wire code of proto/ into the package splitsense.v1 (one command, one place).
#
#   scripts/gen_proto.sh            writes splitsense/v1/ in this repository
#   scripts/gen_proto.sh OUT_ROOT   writes OUT_ROOT/splitsense/v1/ instead (scripts/check_proto.sh uses it)
#
# Messages come from protoc's python generator, services from grpcio-tools, and the .pyi stubs of
# both from mypy-protobuf (typed enums, typed stubs and servicers, which protoc's --pyi_out lacks).
# Never into a top-level `proto` package: ray[serve] installs proto-plus, which owns that name.
# Needs the dev extra: pip install 'splitsense[dev]' (grpcio-tools, mypy-protobuf).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
bindir="$("$PYTHON" -c 'import os, sys; print(os.path.dirname(sys.executable))')"
for plugin in protoc-gen-mypy protoc-gen-mypy_grpc; do
  if [[ ! -x "$bindir/$plugin" ]]; then
    echo "gen_proto: $plugin not found next to $PYTHON; run: pip install 'splitsense[dev]'" >&2
    exit 1
  fi
done
"$PYTHON" -c 'import grpc_tools' 2>/dev/null || {
  echo "gen_proto: grpc_tools is not importable by $PYTHON; run: pip install 'splitsense[dev]'" >&2
  exit 1
}

pkg="$out/splitsense/v1"
mkdir -p "$pkg"
rm -f "$pkg"/*_pb2.py "$pkg"/*_pb2.pyi "$pkg"/*_pb2_grpc.py "$pkg"/*_pb2_grpc.pyi
cd "$root"
"$PYTHON" -m grpc_tools.protoc -I proto \
  --plugin=protoc-gen-mypy="$bindir/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$bindir/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/splitsense/v1/*.proto
cat > "$pkg/__init__.py" <<'PY'
"""Generated wire code of proto/splitsense/v1: do not edit, run scripts/gen_proto.sh.

Only servicers and clients import these modules; everything else works with the typed
dataclasses of splitsense.wire and splitsense.plan.
"""
PY
echo "gen_proto: wrote $(cd "$pkg" && ls -- *.py *.pyi | tr '\n' ' ')in $pkg"
