"""Latency and memory benchmarks of sparse models against dense baselines."""
