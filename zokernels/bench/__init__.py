"""Benchmark support: model shape tables and timing helpers (used by benchmarks/)."""
