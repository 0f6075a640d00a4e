"""Benchmarks: each module writes its measurements as JSON into reports/."""
