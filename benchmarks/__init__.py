"""Benchmarks that print figures and JSON echoing their configuration (tests assert behaviour).

A layer of its own, above edge/, cloud/ and simulators/: a benchmark may drive the real broker
through the device's own transport (edge/transport.py), shape its link with simulators/link.py and
start the cloud (cloud/stack.py); nothing below imports it. `splitsense bench ...` runs each one.

serving_paths    one window via raw gRPC / in-process / naive Ray / the broker at 1-64 devices,
                 p50/p99 and throughput: `python -m benchmarks.serving_paths` / `splitsense bench serve`
planned_vs_best  the planner's choice against the best of every cut, measured through the real path
                 on a grid of shaped links: `python -m benchmarks.planned_vs_best` / `splitsense bench planner`
replan_time      how long replanning the whole fleet takes: `python -m benchmarks.replan_time` /
                 `splitsense bench plan`
entropy_coders   constriction vs CompressAI's rANS on the real bottleneck codes: `splitsense bench coders`
edge_runtime     the device's PyTorch and ONNX Runtime backends side by side: per-cut front latency on
                 one thread, cold start and memory in fresh interpreters, size: `splitsense bench edge`
"""
