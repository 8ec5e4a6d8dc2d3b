"""Benchmarks: coarse-to-fine speedup against its FLOP bound, Ray Train throughput against a bare
loop, sweep efficiency from the stage cache's build records, and the cost of data reduction.

Each benchmark is a module with a frozen config (full-scale defaults, a `tiny` preset for smoke
tests), `run(cfg) -> dict` that also writes `<out>/<name>.json`, and a command line:
`python -m benchmarks.<name> [--tiny] [--dry-run] [key=value ...]`. `benchmarks.run_all` runs
them in turn and writes `summary.json` and `summary.md`.
"""
