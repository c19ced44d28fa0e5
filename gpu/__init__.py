"""GPU tensor operations, device and memory management, benchmarks (torch only, no Prefect)."""
