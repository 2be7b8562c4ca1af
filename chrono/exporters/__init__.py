"""Exporters: push chrono's live routing health into monitoring systems (Prometheus)."""
