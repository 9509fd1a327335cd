#!/usr/bin/env bash
# CI check: regenerates the wire code into a temporary directory and fails if the committed
# splitsense/v1/ differs from it (a hand edit, or a .proto change without scripts/gen_proto.sh).
# The output depends on the generator versions, so CI must install the pinned grpcio-tools and
# mypy-protobuf of the dev extra.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$root/scripts/gen_proto.sh" "$tmp" >/dev/null 2>"$tmp/gen.log" || {
  cat "$tmp/gen.log" >&2
  echo "check_proto: FAILED: scripts/gen_proto.sh did not run" >&2
  exit 1
}
if ! diff -ru -x __pycache__ "$root/splitsense/v1" "$tmp/splitsense/v1" >"$tmp/diff.txt"; then
  head -n 60 "$tmp/diff.txt" >&2
  echo "check_proto: FAILED: splitsense/v1/ is out of date with proto/ (or was edited by hand)." >&2
  echo "check_proto: run scripts/gen_proto.sh and commit the result; if only the generator" >&2
  echo "check_proto: version differs, install the pinned grpcio-tools / mypy-protobuf first." >&2
  exit 1
fi
echo "check_proto: OK: splitsense/v1/ matches proto/"
