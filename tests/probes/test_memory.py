"""Aggregate mode keeps memory flat: 10k steps on a tiny model."""
from __future__ import annotations

import gc
import tracemalloc

import pytest
import torch

import chrono
import probes
import probe_models as T


@pytest.mark.slow
def test_memory_flat_over_10k_steps(store_root):
    m = T.NativeMoE(layers=2, d=8, n_experts=4, top_k=2)
    x = torch.randint(1, T.VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    samples = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-off would dominate
    try:
        _run(m, x, store_root, samples)
    finally:
        torch.set_num_threads(threads)
    growth = samples[10_000] - samples[2_000]
    # 8000 more steps (160 windows, 320 parquet parts): bounded bookkeeping only, not per step
    assert growth < 256 * 1024, f"python heap grew by {growth} bytes over 8000 steps"
    total = chrono.connect(store_root).sql("select sum(tokens) from routing").fetchall()[0][0]
    assert total == 10_000 * 2 * 16 * 2


def _run(m, x, store_root, samples):
    with probes.attach(m, run="mem", root=store_root, flush_every=50) as h:
        tracemalloc.start()
        with torch.no_grad():
            for step in range(10_000):
                m(x)
                h.step()
                if step + 1 in (2_000, 10_000):
                    h.flush()
                    gc.collect()
                    samples[step + 1] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert h.stats()["steps"] == 10_000 and h.stats()["write_errors"] == 0
