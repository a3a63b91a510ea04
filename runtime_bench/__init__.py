"""Runtime benchmarks of 2:4 sparse against dense: one linear layer, or a whole model end to end.

`rose-export bench linear|model` (see runtime_bench/cli.py); the backends live in one registry
(runtime_bench/backends.py).
"""
