"""A newcomer's walk through the docs (write API side): Ctrl-C must never lose data."""
import numpy as np
import pytest

import chrono
import chrono.store.writer as writer_module

MODEL = {"layers": [0], "experts_per_layer": {"0": 4}, "top_k": 1}


class _InterruptOnce:
    """pq.write_table that raises ``exc`` (a Ctrl-C by default) on its first call."""

    def __init__(self, real, exc=KeyboardInterrupt):
        self.real, self.exc, self.calls = real, exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise self.exc
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("explicit_flush", [True, False])
def test_ctrl_c_while_a_part_is_written_loses_no_row(tmp_path, monkeypatch, explicit_flush):
    # README/DESIGN: "a killed writer loses at most the unflushed buffer"; BRIEF: never lost data.
    # A KeyboardInterrupt inside flush() (while pq.write_table ran) dropped the rows that flush
    # had taken out of the buffer: `with open_run(...)` then closed with them gone for good
    # (0 of 5 routing rows stored). They must stay buffered and be written at close.
    monkeypatch.setattr(writer_module.pq, "write_table", _InterruptOnce(writer_module.pq.write_table))
    counts = np.array([1, 2, 3, 4])
    with pytest.raises(KeyboardInterrupt):
        with chrono.open_run(tmp_path, "k", model=MODEL) as w:
            for step in range(5):
                w.log_routing(step, layer=0, counts=counts * (step + 1))
                w.log_signal(step, "loss", float(step))
            if explicit_flush:
                w.flush()
    monkeypatch.undo()
    con = chrono.connect(tmp_path)
    rows = con.execute("SELECT step, expert, tokens FROM routing WHERE run_id = 'k' ORDER BY ALL").fetchall()
    assert rows == [(s, e, int(counts[e]) * (s + 1)) for s in range(5) for e in range(4)]
    assert con.execute("SELECT count(*) FROM signals").fetchall() == [(5,)]
    assert not list(tmp_path.rglob(".*.tmp"))   # no temporary part left behind


def test_a_write_error_with_on_error_raise_keeps_the_rows_buffered(tmp_path, monkeypatch):
    # The same kind with on_error="raise": the error reaches the caller, the rows stay pending
    # and the next flush writes them.
    w = chrono.open_run(tmp_path, "r", model=MODEL, on_error="raise")
    w.log_routing(0, layer=0, counts=[4, 3, 2, 1])
    monkeypatch.setattr(writer_module.pq, "write_table",
                        _InterruptOnce(writer_module.pq.write_table, OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        w.flush()
    assert w.pending_rows() == 4
    w.close()
    con = chrono.connect(tmp_path)
    assert con.execute("SELECT sum(tokens) FROM routing WHERE run_id = 'r'").fetchall() == [(10,)]
