"""A tiny store whose analyses are computed by hand in the tests (see the comments there).

Run ``hand``: 2 layers x 4 experts, top-2. Per-token rows (token_id, then the
(k=0, k=1) experts at layer 0 and at layer 1):

    step 0, batch 0:  pos 0 id 10  L0 (0, 1)  L1 (1, 0)
                      pos 1 id 11  L0 (2, 3)  L1 (3, 2)
                      pos 2 id 10  L0 (0, 1)  L1 (1, 3)
                      pos 3 id 12  L0 (1, 2)  L1 (0, 2)
    step 1, batch 0:  pos 0 id 11  L0 (2, 0)  L1 (3, 1)
                      pos 1 id 10  L0 (0, 1)  L1 (3, 0)

Routing rows (tokens per expert), steps 0..3:
    layer 0: [4, 2, 2, 0], [3, 3, 1, 1], [0, 0, 4, 4], [1, 1, 3, 3]
    layer 1: [2, 2, 2, 2] at every step

Run ``aggregate-only`` has the same routing rows and no per-token rows;
run ``top1`` has per-token rows with k = 0 only.
"""
from __future__ import annotations

import numpy as np

import chrono

RUN, AGG_RUN, TOP1_RUN = "hand", "aggregate-only", "top1"
MODEL = {"name": "hand", "layers": [0, 1], "experts_per_layer": {"0": 4, "1": 4}, "top_k": 2,
         "adapter": "native"}

TOKENS = [  # step, pos, token id, layer-0 experts, layer-1 experts
    (0, 0, 10, (0, 1), (1, 0)),
    (0, 1, 11, (2, 3), (3, 2)),
    (0, 2, 10, (0, 1), (1, 3)),
    (0, 3, 12, (1, 2), (0, 2)),
    (1, 0, 11, (2, 0), (3, 1)),
    (1, 1, 10, (0, 1), (3, 0)),
]

ROUTING = {
    0: [[4, 2, 2, 0], [3, 3, 1, 1], [0, 0, 4, 4], [1, 1, 3, 3]],
    1: [[2, 2, 2, 2]] * 4,
}


def _routing(w):
    for step in range(4):
        w.log_routing(step, [0, 1], np.array([ROUTING[0][step], ROUTING[1][step]]))


def build(root) -> None:
    with chrono.open_run(root, RUN, model=MODEL) as w:
        _routing(w)
        for step, pos, tid, l0, l1 in TOKENS:
            for layer, ex in ((0, l0), (1, l1)):
                w.log_tokens(step, layer, list(ex), weight=[0.6, 0.4], batch_idx=0, position=pos,
                             k=[0, 1], token_id=tid)
    with chrono.open_run(root, AGG_RUN, model=MODEL) as w:
        _routing(w)
    with chrono.open_run(root, TOP1_RUN, model=dict(MODEL, top_k=1)) as w:
        _routing(w)
        for step, pos, tid, l0, l1 in TOKENS:
            w.log_tokens(step, 0, l0[0], batch_idx=0, position=pos, k=0, token_id=tid)
