"""Benchmarks that print figures and JSON echoing their configuration (tests assert behaviour).

plan    replanning the whole fleet: `python -m cloud.benchmarks.plan` / `splitsense bench plan --json`
serve   one window via raw gRPC / in-process / naive Ray / the broker at 1-64 devices:
        `python -m cloud.benchmarks.serve` / `splitsense bench serve --json`
"""
