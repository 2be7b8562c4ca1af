"""Property-based fuzzing (hypothesis): the readers with random, truncated, foreign and
mis-filed Parquet parts, and the CLI with random arguments."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chrono
from chrono_cli.main import main as cli_main
from chrono.schema import TABLES
from chrono.store import table_dir

_SETTINGS = dict(deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ = settings(max_examples=20, **_SETTINGS)
FUZZ_SLOW = settings(max_examples=300, **_SETTINGS)
GOOD_ROWS = 2 * 8  # routing rows of the one valid part every example starts with


def _valid_part_bytes(table="routing", drop=()) -> tuple[bytes, int]:
    """Bytes of a real part file written by RunWriter for ``table`` (minus columns ``drop``)."""
    tmp = pa.BufferOutputStream()
    if table == "routing":
        t = pa.table({"run_id": ["r"] * 3, "step": pa.array([5, 5, 5], pa.int64()),
                      "mode": ["TRAIN"] * 3, "layer": pa.array([0, 0, 0], pa.int32()),
                      "expert": pa.array([0, 1, 2], pa.int32()), "tokens": pa.array([1, 2, 3], pa.int64()),
                      "weight_sum": pa.array([None] * 3, pa.float32()),
                      "dropped": pa.array([0, 0, 0], pa.int64()), "rank": pa.array([0, 0, 0], pa.int32())})
    else:  # a tokens part (mis-filed into routing/ by the fuzzer)
        t = pa.table({c.name: pa.array([None], c.type) if c.nullable else
                      pa.array(["r"] if pa.types.is_string(c.type) else [0], c.type) for c in TABLES[table]})
    t = t.drop_columns(list(drop))
    t = t.replace_schema_metadata({b"chrono.table": table.encode()})
    pq.write_table(t, tmp)
    return tmp.getvalue().to_pybytes(), t.num_rows


_pool_types = st.sampled_from([pa.int8(), pa.int32(), pa.int64(), pa.float32(), pa.float64(), pa.string(),
                               pa.bool_(), pa.binary(), pa.timestamp("ms"), pa.list_(pa.int32())])
# any names, including real routing columns, but never `tokens` (no default): always foreign
_pool_names = st.sampled_from(["run_id", "step", "mode", "layer", "expert", "weight_sum", "dropped",
                               "rank", "a", "value", "STEP", "tokens_"])


@st.composite
def foreign_parquet(draw) -> bytes:
    names = draw(st.lists(_pool_names, min_size=1, max_size=6, unique=True))
    n = draw(st.integers(0, 5))
    cols = {}
    for name in names:
        t = draw(_pool_types)
        cols[name] = pa.array([None] * n, t)  # typed nulls: any type, any length
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue().to_pybytes()


@st.composite
def intruder(draw):
    """(file bytes, rows it must add to routing: 0 unless it is a valid older-version part)."""
    kind = draw(st.sampled_from(["random", "truncated", "foreign", "misfiled", "empty", "old_version"]))
    if kind == "random":
        return draw(st.binary(max_size=600)), 0
    if kind == "truncated":
        data, _ = _valid_part_bytes()
        return data[:draw(st.integers(0, len(data) - 1))], 0
    if kind == "foreign":
        return draw(foreign_parquet()), 0
    if kind == "misfiled":
        return _valid_part_bytes("tokens")[0], 0
    if kind == "empty":
        return b"", 0
    data, rows = _valid_part_bytes(drop=("dropped", "weight_sum"))  # older schema: still readable
    return data, rows


def _base_store(root):
    with chrono.open_run(root, "r") as w:
        w.log_routing(0, np.arange(2), np.ones((2, 8)))
        w.log_signal(0, "loss", 1.0)


def _check_readers_survive(tmp_path, intruders):
    root = tmp_path / "store"
    shutil.rmtree(root, ignore_errors=True)
    _base_store(root)
    extra = 0
    for i, (data, rows) in enumerate(intruders):
        (table_dir(root, "routing", "r") / f"part-00007-{i:08d}.parquet").write_bytes(data)
        (table_dir(root, "signals", "r") / f"part-00007-{i:08d}.parquet").write_bytes(data)
        extra += rows
    con = chrono.connect(root)
    for table in TABLES:  # every view answers
        con.execute(f"SELECT * FROM {table}").fetchall()
    assert con.sql("SELECT count(*), sum(tokens) FROM routing").fetchall() == [(GOOD_ROWS + extra,
                                                                              GOOD_ROWS + 6 * extra // 3)]
    assert con.sql("SELECT count(*) FROM signals").fetchall() == [(1,)]
    assert con.sql("SELECT count(*) FROM routing WHERE dropped IS NULL").fetchall() == [(0,)]
    lf = chrono.read(root, "routing").collect()
    assert lf.height == GOOD_ROWS + extra and lf["dropped"].null_count() == 0
    assert chrono.read(root, "signals").collect().height == 1
    assert cli_main(["--root", str(root), "runs"]) == 0
    assert cli_main(["--root", str(root), "show", "r"]) == 0


@FUZZ
@given(intruders=st.lists(intruder(), min_size=1, max_size=5))
def test_readers_survive_random_truncated_and_foreign_parts(tmp_path, intruders):
    _check_readers_survive(tmp_path, intruders)


@pytest.mark.slow
@FUZZ_SLOW
@given(intruders=st.lists(intruder(), min_size=1, max_size=8))
def test_readers_survive_random_parts_many_examples(tmp_path, intruders):
    _check_readers_survive(tmp_path, intruders)


def test_corrupt_data_pages_give_one_line_cli_error(store_root, capsys):
    """Known limit, pinned: a part whose footer is intact but whose pages are corrupt (media
    damage; chrono's own writes are atomic) is listed, and a query touching it fails with
    one line, exit 1, instead of a traceback."""
    with chrono.open_run(store_root, "r") as w:
        w.log_routing(0, np.arange(4), np.arange(256).reshape(4, 64))
    (part,) = table_dir(store_root, "routing", "r").glob("part-*.parquet")
    b = bytearray(part.read_bytes())
    for i in range(8, 1200, 13):
        b[i] ^= 0xFF
    part.write_bytes(bytes(b))
    assert cli_main(["--root", str(store_root), "runs"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("chrono: error: reading the store failed") and err.count("\n") == 1


_words = st.sampled_from(["runs", "show", "query", "alerts", "snapshot", "compact", "r", "nosuch",
                          "--every", "--format", "--output", "--max-rows", "--root", "-o", "--help",
                          "csv", "json", "table", "parquet", "0", "-1", "3", "SELECT 1",
                          "SELECT * FROM routing", "DROP VIEW routing", "../r", "", "--", "-"])


@settings(max_examples=150, **_SETTINGS)
@given(argv=st.lists(st.one_of(_words, st.text(max_size=12)), max_size=6))
def test_cli_never_crashes_on_random_arguments(tmp_path, capsys, argv):
    root = tmp_path / "store"
    if not root.exists():
        _base_store(root)
    argv = [a for a in argv if "\x00" not in a]  # argv cannot hold NUL bytes
    # never let the fuzzer choose the store root or an output path: keep writes in tmp_path
    argv = [a if a not in ("--root", "--output", "-o") else "--every" for a in argv]
    try:
        code = cli_main(["--root", str(root), *argv])
    except SystemExit as e:  # argparse: --help exits 0, errors exit 2
        code = e.code
    out = capsys.readouterr()
    assert code in (0, 2), (argv, code, out.err)
    assert "Traceback" not in out.err
    if code == 2 and argv:
        assert out.err.startswith("chrono: error:") and out.err.count("\n") == 1, (argv, out.err)
