"""Reproducible benchmarks (not tests): `make bench`."""
