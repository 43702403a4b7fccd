"""Benchmarks: each stage beside the tool a user would run instead, same input, same run."""
