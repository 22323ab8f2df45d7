"""Prometheus metrics and structured request-scoped logs."""
