"""Helpers for tests, benchmarks and the demo: toy digit ViTs, random valid permutations."""
