"""Throughput benchmarks (``python -m cljax.bench``): step, full path, input, host decoding."""
