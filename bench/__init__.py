"""Benchmarks of the books service (`uv run python -m bench --help`)."""
