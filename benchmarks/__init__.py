"""Benchmarks on the reference workloads of ../shared/BENCHMARKS.md (run: python -m benchmarks.run)."""
