"""The typed records a count travels in (probes/records.py): shapes and dtypes as documented."""
import dataclasses

import numpy as np
import pytest
import torch

from probes.recorder import EVAL, TRAIN, Recorder
from probes.records import ClosedWindow, RoutingBlock, Signal, TokenRows, WindowArrays
from probes.routing import Routed
from probes.rows import invalid_indices, padding_signals, routing_blocks


def _window():
    rec = Recorder(n_slots=2, capacity=4, history=3)
    # step 0: slot 0 gets experts [0, 1, 1] (TRAIN), slot 1 gets [3] with one dropped (EVAL)
    rec.record(TRAIN, 0, Routed(torch.tensor([[0], [1], [1]]), torch.tensor([[0.5], [0.25], [0.25]])))
    rec.record(EVAL, 1, Routed(torch.tensor([[3, 2]]), None, torch.tensor([[False, True]])))
    rec.end_step(0)
    # step 1: slot 0, an invalid index 9 and a padded token (mask 0)
    rec.record(TRAIN, 0, Routed(torch.tensor([[9], [2]])), mask=torch.tensor([1.0, 0.0], dtype=torch.float64),
               pad=torch.tensor(1.0, dtype=torch.float64))
    rec.end_step(1)
    return rec.take(2)


def test_recorder_take_is_a_window_arrays_with_documented_dtypes():
    a = _window()
    assert isinstance(a, WindowArrays) and a.n_steps == 2
    assert a.counts.shape == a.dropped.shape == a.weight.shape == (2, 3, 2, 4)
    assert a.counts.dtype == a.dropped.dtype == np.int64 and a.weight.dtype == np.float64
    for x in (a.invalid, a.nonfinite, a.padding):
        assert x.shape == (2, 3, 2) and x.dtype == np.int64
    assert a.counts[0, TRAIN, 0].tolist() == [1, 2, 0, 0]
    assert a.weight[0, TRAIN, 0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert a.counts[0, EVAL, 1].tolist() == [0, 0, 0, 1] and a.dropped[0, EVAL, 1].tolist() == [0, 0, 1, 0]
    assert a.invalid[1, TRAIN, 0] == 1 and a.padding[1, TRAIN, 0] == 1 and a.counts[1].sum() == 0
    c, d = a.window_sums()
    assert c.shape == d.shape == (2, 4) and c.sum() == 4 and d.sum() == 1
    with pytest.raises(AttributeError):
        a.counts = None                                        # immutable


def test_rows_are_typed_blocks_and_signals():
    a = _window()
    steps, layers = np.array([10, 11], np.int64), np.array([0, 5], np.int32)
    blocks = routing_blocks(steps, layers, [4, 4], a)
    assert all(isinstance(b, RoutingBlock) for b in blocks)
    by_mode = {b.mode: b for b in blocks}
    assert set(by_mode) == {"TRAIN", "EVAL"}                  # the step with only padding/invalid: none
    t = by_mode["TRAIN"]
    assert t.step.tolist() == [[10]] and t.step.dtype == np.int64
    assert t.layer.tolist() == [[0, 5]] and t.layer.dtype == np.int32
    assert t.counts.shape == t.weight_sum.shape == t.dropped.shape == (1, 2, 4) and t.n_rows == 8
    assert t.counts.dtype == np.int64 and t.weight_sum.dtype == np.float64 and t.expert_offset is None
    assert invalid_indices(a, [4, 3]).tolist() == [1, 1]      # expert 3 of slot 1 is beyond n=3
    sig = padding_signals(steps, layers, a.padding)
    assert sig == [Signal(11, "probes.padding_excluded", 1.0, 0)]
    cw = ClosedWindow(sizes={0: 4, 5: 4}, blocks=tuple(blocks),
                      tokens=TokenRows(np.zeros((3, 10), np.int64), np.zeros(3, np.float32)),
                      snapshot=None, signals=tuple(sig), write_globals=True)
    assert cw.n_rows == sum(b.n_rows for b in blocks) + 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cw.sizes = {}
