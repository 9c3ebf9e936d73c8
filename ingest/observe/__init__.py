"""Prometheus metrics, the /metrics endpoint and the live-progress collector."""
