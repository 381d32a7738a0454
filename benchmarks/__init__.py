"""Benchmark suite of imgcache: ``python -m benchmarks [--quick]``.

Every scenario starts imgcache and the baselines it is compared with on one local
control plane (tests/testbed) in the same run, and writes docs/benchmarks.md,
docs/benchmarks/results.json and the plots next to them.
"""
