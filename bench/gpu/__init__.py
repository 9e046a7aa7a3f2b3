"""GPU check and benchmarks (bench/gpu/check.sh)."""
