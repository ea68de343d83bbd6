"""sipis benchmarks (``make bench``): figures beside references measured in the same run."""
