"""vswitch benchmarks."""
