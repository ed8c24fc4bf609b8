"""Performance tools: the benchmark and the GPU check."""
