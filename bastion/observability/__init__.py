"""Observability: what the server counts (stats.py) and how /metrics shows it (metrics.py)."""
