"""A byte-level run for the Specialization page: 2 layers x 8 experts, top-2, every token.

Layer 0 routes byte b to experts (b mod 8, (b div 8) mod 8 or the next one); layer 1 to
((b + 3) mod 8, ...); so expert 0 of layer 0 receives the bytes with b mod 8 = 0, of which
the space (32) is the most frequent in TEXT. The manifest says ``byte_level: true``.
"""
from __future__ import annotations

import numpy as np

import chrono

RUN = "bytes-run"
TEXT = (b"the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
        b"sphinx of black quartz, judge my vow! ") * 4
SEQ, STEPS, EXPERTS = 64, 30, 8


def experts(b: np.ndarray, layer: int) -> np.ndarray:
    e0 = (b + 3 * layer) % EXPERTS
    e1 = (b // EXPERTS + layer) % EXPERTS
    e1 = np.where(e1 == e0, (e0 + 1) % EXPERTS, e1)
    return np.stack([e0, e1], 1)


def build(root) -> None:
    data = np.frombuffer(TEXT, dtype=np.uint8).astype(np.int64)
    model = {"name": "bytes", "layers": [0, 1], "experts_per_layer": {"0": EXPERTS, "1": EXPERTS},
             "top_k": 2}
    with chrono.open_run(root, RUN, model=model, config={"byte_level": True}) as w:
        for step in range(STEPS):
            start = (step * 17) % (data.size - SEQ)
            b = data[start:start + SEQ]
            counts = []
            for layer in (0, 1):
                ex = experts(b, layer)
                w.log_tokens(step, layer, ex.reshape(-1), batch_idx=0, position=np.repeat(np.arange(SEQ), 2),
                             k=np.tile([0, 1], SEQ), token_id=np.repeat(b, 2))
                counts.append(np.bincount(ex.reshape(-1), minlength=EXPERTS))
            w.log_routing(step, [0, 1], np.array(counts))
