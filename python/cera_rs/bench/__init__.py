"""Benchmarks: measured side by side in one process, interleaved, median of repeats."""
