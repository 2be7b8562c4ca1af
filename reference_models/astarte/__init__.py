"""Astarte reference workload (stateful null-channel model)."""
