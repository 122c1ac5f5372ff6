"""Benchmarks of the fused kernels and of training throughput; `bench.harness` is their shared setup."""
