"""fedsilo benchmarks: run from the repository root as `python -m bench.NAME`, or `make bench`."""
