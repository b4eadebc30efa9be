"""GPU tests: skipped where no CUDA device is present (the sampling engine milestone adds them)."""
