"""Reproducible speed/memory measurements: ``python -m benchmarks.NAME --json out.json``."""
