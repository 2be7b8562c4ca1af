"""The semantic MoE's configuration and presets (read by ``model.py`` and ``router.py``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SemanticMoEConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 128          # hidden width of one expert
    n_experts: int = 8
    top_k: int = 2
    d_meaning: int = 32      # MeaningSpace dimension
    teacher_tau: float = 0.1  # temperature of teacher scores (distances of unit vectors are in [0, 4])
    load_penalty: float = 1.0  # weight of the overload penalty on log-probabilities
    load_momentum: float = 0.9
    reservoir: int = 8192    # meaning vectors kept per layer for re-clustering
    dense: bool = False      # dense FFN of width top_k * d_ff (equal active parameters)
    faithful: bool = False
    seed: int = 0


PRESETS = {
    # runs in seconds on a laptop CPU; used by the test suite
    "quick": dict(block_size=32, n_layer=1, n_head=2, d_model=32, d_ff=64, n_experts=4, top_k=2,
                  d_meaning=16),
    "small": dict(),
}
