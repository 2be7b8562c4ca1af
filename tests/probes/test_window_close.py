"""Closing a window in O(1) (issue 19): the recorder's double buffering and window sums, where
the snapshot is built, and the durability point of the deferred write."""
import threading

import numpy as np
import torch

import chrono
import probes
import probe_models as T
from probes.recorder import DROPPED, EVAL, TOKENS, TRAIN, Recorder, window_arrays
from probes.routing import Routed


def _step(rec, i, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 6, (32, 2), generator=g)
    w = torch.rand(32, 2, generator=g, dtype=torch.float32)
    drop = torch.rand(32, 2, generator=g) < 0.2
    rec.record(TRAIN, 0, Routed(idx, w))
    rec.record(EVAL, 1, Routed(idx.flip(0), None, drop))
    rec.end_step(i)
    return idx, drop


def test_swap_hands_over_the_filled_buffer_and_the_window_sum():
    rec = Recorder(n_slots=2, capacity=6, history=3)
    truth = []
    for i in range(3):
        truth.append(_step(rec, i, seed=i))
    rows, sums = rec.swap(3)
    x = rows.numpy().copy()
    np.testing.assert_array_equal(sums, x.sum(axis=0))   # the running sum is the rows' sum
    a = window_arrays(x, 6)
    for i, (idx, drop) in enumerate(truth):   # counts computed independently with NumPy
        np.testing.assert_array_equal(a.counts[i, TRAIN, 0], np.bincount(idx.reshape(-1).numpy(), minlength=6))
        kept = idx.flip(0).reshape(-1).numpy()[~drop.reshape(-1).numpy()]
        np.testing.assert_array_equal(a.counts[i, EVAL, 1], np.bincount(kept, minlength=6))
    # the next window is written into the other buffer: the handed-over rows stay as they were
    for i in range(3):
        _step(rec, i, seed=10 + i)
    np.testing.assert_array_equal(rows.numpy(), x)
    rows2, sums2 = rec.swap(3)
    assert rows2.data_ptr() != rows.data_ptr()
    # 3 steps x 2 calls x 64 assignments, each either counted or dropped
    assert sums2[TOKENS].sum() + sums2[DROPPED].sum() == 3 * 2 * 64
    np.testing.assert_array_equal(sums2, rows2.numpy().sum(axis=0))
    _step(rec, 0, seed=20)
    rows3, _ = rec.swap(1)     # the third window reuses the first buffer
    assert rows3.data_ptr() == rows.data_ptr()
    assert rec.nbytes == 4 * 3 * 2 * 8 * 8 * (2 + 2 * 3)


def _ids(b=2, s=8):
    return torch.randint(1, T.VOCAB, (b, s), generator=torch.Generator().manual_seed(0))


def test_snapshot_on_the_writer_thread_unless_callbacks_need_it(store_root, monkeypatch):
    import probes.snapshot_stage as stage_mod
    built_in, orig = [], stage_mod.layer_rows

    def spy(*a, **k):
        built_in.append(threading.current_thread().name)
        return orig(*a, **k)

    monkeypatch.setattr(stage_mod, "layer_rows", spy)
    m, me = T.NativeMoE(), threading.current_thread().name
    with probes.attach(m, run="snap", root=store_root, flush_every=2, steps="manual") as h:
        for _ in range(2):
            m(_ids()); h.step()
        rows = h.latest_snapshot()            # waits for the snapshot the writer thread builds
        assert rows and {(r["window_start"], r["step"]) for r in rows} == {(0, 1)}
        assert built_in == ["probes-writer"]
        seen = []
        h.on_snapshot(lambda step, rows, handle: seen.append((step, threading.current_thread().name)))
        for _ in range(2):
            m(_ids()); h.step()
        assert built_in[-1] == me                 # with a callback: built in the training thread
        assert seen == [(3, me)]                  # and called before h.step() returned


def test_a_closed_window_is_on_disk_when_the_next_step_ends(store_root):
    """Durability without h.flush(): the window closed at step s's end is readable once step
    s + 1 has ended (a crash loses at most one flush interval)."""
    m = T.NativeMoE()
    with probes.attach(m, run="dur", root=store_root, flush_every=3, steps="manual") as h:
        for _ in range(3):
            m(_ids()); h.step()                    # closes window [0, 2]
        m(_ids()); h.step()                        # the next step ends: window [0, 2] is written
        steps = chrono.connect(store_root).sql(
            "SELECT DISTINCT step FROM routing WHERE run_id = 'dur' ORDER BY step").fetchall()
        assert [s for (s,) in steps] == [0, 1, 2]
        assert h.stats()["rows_written"]["routing"] > 0
