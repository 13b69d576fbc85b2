"""Benchmarks of issue 7: `python -m bench --help`."""
