"""Throughput and memory benchmarks of l2p-jax (not tests); see benchmarks/run.py."""
