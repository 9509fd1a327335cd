"""Generated wire code of proto/splitsense/v1: do not edit, run scripts/gen_proto.sh.

Only servicers and clients import these modules; everything else works with the typed
dataclasses of splitsense.wire and splitsense.plan.
"""
