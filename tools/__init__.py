"""Benchmarks and helpers, run from the repository root as `python -m tools.NAME`; the product never imports them."""
