"""VAR reference workload (verifiable adaptive routing)."""
