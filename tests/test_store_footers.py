"""``chrono.store.footers`` (part footers read by DuckDB, no pyarrow) against pyarrow's ``part_info``.

The ground truth is the pyarrow path: ``catalog.part_info`` for each part, and a full
``chrono.connect`` (every view, pyarrow footers) for ``chrono runs``' table. The store holds
the kinds of part a reader meets: chrono's own (current and compacted), a version-1 legacy run,
rows the write API would refuse, foreign files (DuckDB- and pyarrow-written, wrong types,
another table's label, a duration column, nested columns, truncated, empty, malformed metadata),
and parts that keep chrono's label but whose stored Arrow schema restores another type (read with
pyarrow, one column cast, written back; or an ``ARROW:schema`` value forged or broken).
"""
from __future__ import annotations

import base64
import io
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import chrono
from chrono.health import OK, run_health
from chrono.queries import RUNS_TABLE_SQL, RUNS_TABLE_VIEWS
from chrono.schema import TABLES
from chrono.store import catalog, compact, table_dir
from chrono.store.footers import _footers, _vouch, part_infos
from chrono_cli.common import print_table
from chrono_cli.main import main

V1 = Path(__file__).resolve().parent / "fixtures" / "store_v1"
MODEL = {"layers": [0, 1], "experts_per_layer": {"0": 4, "1": 4}, "top_k": 1}


def _collapsing_run(root, run: str, seed: int) -> None:
    """Routing that collapses onto expert 0 halfway, with its snapshots and alerts (raised ones)."""
    from chrono.snapshots import alerts_for, build_snapshots

    rng = np.random.default_rng(seed)
    with chrono.open_run(root, run, model=MODEL) as w:
        for s in range(40):
            p = np.array([0.25] * 4) if s < 20 else np.array([0.97, 0.01, 0.01, 0.01])
            w.log_routing(s, np.arange(2), rng.multinomial(400, p, size=2))
    with chrono.open_run(root, run) as w:   # a second session: a second routing part
        w.log_routing(40, np.arange(2), rng.multinomial(400, [0.97, 0.01, 0.01, 0.01], size=2))
    routing = chrono.connect(root).sql(
        "SELECT step, layer, expert, sum(tokens) AS tokens, sum(dropped) AS dropped FROM routing "
        "WHERE run_id = ? GROUP BY ALL", params=[run]).to_arrow_table()
    snaps = build_snapshots(run, routing, 5)
    with chrono.open_run(root, run) as w:
        w.replace_table("snapshots", snaps)
        w.replace_table("alerts", alerts_for(snaps))


def _foreign(root, run: str, name: str, table: pa.Table, metadata: dict | None = None) -> None:
    d = table_dir(root, "routing", run)
    d.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, d / name)


def _routing_rows(run: str, n: int = 3, **overrides) -> dict:
    cols = {"run_id": [run] * n, "step": list(range(n)), "mode": ["TRAIN"] * n, "layer": [0] * n,
            "expert": [1] * n, "tokens": [7] * n, "weight_sum": [None] * n, "dropped": [0] * n, "rank": [3] * n}
    cols.update(overrides)
    return cols


# Casts of one column of chrono's own routing part; pyarrow keeps the schema metadata, so the
# chrono label survives and only the stored Arrow schema tells the new type (DuckDB's Parquet types
# show some of them, not all: a duration or an opaque extension over INT64 look like int64).
RELABELLED = {
    "duration": ("tokens", pa.duration("s")),
    "timestamp": ("step", pa.timestamp("ms")),
    "timestamp_tz": ("step", pa.timestamp("us", "UTC")),
    "date32": ("layer", pa.date32()),
    "time32": ("layer", pa.time32("s")),
    "large_string": ("run_id", pa.large_string()),
    "string_view": ("mode", pa.string_view()),
    "dictionary_string": ("mode", pa.dictionary(pa.int32(), pa.string())),
    "dictionary_int64": ("tokens", pa.dictionary(pa.int8(), pa.int64())),
    "int8": ("layer", pa.int8()),
    "int16": ("expert", pa.int16()),
    "uint32": ("layer", pa.uint32()),
    "uint64": ("tokens", pa.uint64()),
    "float64": ("weight_sum", pa.float64()),
    "float16": ("weight_sum", pa.float16()),
    "decimal": ("tokens", pa.decimal128(20, 0)),
    "binary": ("run_id", pa.binary()),
    "large_binary": ("run_id", pa.large_binary()),
    "opaque_int64": ("tokens", pa.opaque(pa.int64(), "ticks", "acme")),
    "opaque_string": ("mode", pa.opaque(pa.string(), "label", "acme")),
    "json": ("run_id", pa.json_(pa.string())),
}


def _cast(column: pa.ChunkedArray, to: pa.DataType) -> pa.Array:
    a = column.combine_chunks()
    if isinstance(to, pa.ExtensionType):
        return pa.ExtensionArray.from_storage(to, a.cast(to.storage_type))
    if pa.types.is_dictionary(to):
        return a.cast(to.value_type).dictionary_encode().cast(to)
    return a.cast(to)


def _relabelled_parts(root, run: str) -> None:
    """Labelled routing parts of ``run`` whose stored Arrow schema restores a type Parquet may not show."""
    d = table_dir(root, "routing", run)
    own = pq.read_table(d / "part-00000-00000000.parquet")
    for i, (column, to) in enumerate(RELABELLED.values()):
        k = own.schema.get_field_index(column)
        t = own.set_column(k, pa.field(column, to, own.schema.field(k).nullable), _cast(own.column(k), to))
        assert t.schema.metadata[b"chrono.table"] == b"routing"
        pq.write_table(t, d / f"part-00010-{i:08d}.parquet")
    label = own.schema.metadata
    forged = {   # ARROW:schema values given in the schema metadata: pyarrow's writer stores it, then its own
        "duration": own.schema.set(5, pa.field("tokens", pa.duration("ms"), False)),
        "renamed": own.schema.set(0, pa.field("run", pa.string(), False)),
        "other_table": TABLES["alerts"],
        "fewer_fields": own.schema.remove(8),
    }
    for i, (name, schema) in enumerate(forged.items()):
        value = base64.b64encode(schema.serialize().to_pybytes())
        pq.write_table(own.replace_schema_metadata({**label, b"ARROW:schema": value}),
                       d / f"part-00011-{i:08d}.parquet")
    broken = (b"not base64!", b"AAAA", base64.b64encode(own.schema.serialize().to_pybytes())[:60])
    for i, value in enumerate(broken):
        pq.write_table(own.replace_schema_metadata({**label, b"ARROW:schema": value}),
                       d / f"part-00012-{i:08d}.parquet")
    # The same values as the only ARROW:schema of a DuckDB-written part.
    con = duckdb.connect()
    values = [base64.b64encode(s.serialize().to_pybytes()) for s in (own.schema, *forged.values())]
    values += broken
    for i, value in enumerate(values):
        con.execute(f"COPY (SELECT * FROM read_parquet('{d / 'part-00000-00000000.parquet'}')) "
                    f"TO '{d / f'part-00013-{i:08d}.parquet'}' "
                    f"(FORMAT parquet, KV_METADATA {{'chrono.table': 'routing', 'ARROW:schema': '{value.decode()}'}})")


def build_zoo(root: Path) -> None:
    _collapsing_run(root, "alerting", 0)
    _collapsing_run(root, "compacted", 1)
    compact(root, "compacted")                        # parts naming the parts they supersede
    with chrono.open_run(root, "calm", model=MODEL) as w:
        w.log_routing(0, 0, np.full(4, 10))
    shutil.copytree(V1 / "v1-run", root / "v1-run")   # the pre-hive layout, schema version 1
    with chrono.open_run(root, "odd", model=MODEL) as w:
        w.log_routing(0, 0, np.full(4, 3))
    schema = TABLES["routing"]
    ok = pa.table(_routing_rows("odd"), schema=schema)
    _foreign(root, "odd", "part-00009-00000001.parquet",   # rows the write API refuses, pyarrow-written
             pa.table(_routing_rows("odd", tokens=[-5, 2 ** 60, 1], mode=["TRAIN", "WARMUP", "EVAL"]),
                      schema=schema))
    _foreign(root, "odd", "part-00009-00000002.parquet", ok,   # labelled by chrono, another table
             {b"chrono.table": b"alerts"})
    _foreign(root, "odd", "part-00009-00000003.parquet",   # tokens as a double
             pa.table(_routing_rows("odd", tokens=[1.0, 2.0, 3.0])))
    _foreign(root, "odd", "part-00009-00000004.parquet",   # an int64 column pyarrow reads back as a duration
             ok.set_column(5, "tokens", pa.array([1, 2, 3], pa.duration("s"))))
    _foreign(root, "odd", "part-00009-00000005.parquet",   # a nested column
             ok.append_column("extra", pa.array([[1], [2], []], pa.list_(pa.int32()))))
    _foreign(root, "odd", "part-00009-00000006.parquet", ok.drop_columns(["expert"]))   # a column missing
    _foreign(root, "odd", "part-00009-00000007.parquet", ok.drop_columns(["dropped", "rank"]))  # defaults
    _foreign(root, "odd", "part-00009-00000008.parquet", ok,   # malformed supersession metadata
             {b"chrono.table": b"routing", b"chrono.replaces": b"[1, 2]"})
    _foreign(root, "odd", "part-00009-00000009.parquet", ok,
             {b"chrono.table": b"routing", b"chrono.replaces": b"not json"})
    d = table_dir(root, "routing", "odd")
    good = (d / "part-00009-00000001.parquet").read_bytes()
    (d / "part-00009-00000010.parquet").write_bytes(good[: len(good) // 2])   # truncated
    (d / "part-00009-00000011.parquet").write_bytes(b"")                       # empty
    con = duckdb.connect()
    con.execute(f"COPY (SELECT run_id, step, mode, layer, expert, tokens, weight_sum, dropped, rank "
                f"FROM read_parquet('{d / 'part-00009-00000001.parquet'}')) "
                f"TO '{d / 'part-00009-00000012.parquet'}' (FORMAT parquet)")   # DuckDB-written, no Arrow schema
    con.execute(f"COPY (SELECT 'odd' AS run_id, 1::BIGINT AS step, 'TRAIN' AS mode, 0 AS layer, 1 AS expert, "
                f"9::UBIGINT AS tokens) TO '{d / 'part-00009-00000013.parquet'}' (FORMAT parquet)")   # unsigned
    _relabelled_parts(root, "odd")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    build_zoo(root)
    return root


def _parts(root) -> list[tuple[str, str]]:
    return [(p, t) for t in TABLES for paths in catalog.part_candidates(root, t) for p in paths]


def test_verdicts_equal_pyarrows_for_every_part(zoo):
    parts = _parts(zoo)
    assert len(parts) > 50
    fast = part_infos(duckdb.connect(), parts)
    wrong = [(Path(p).name, t, fast[p].readable) for p, t in parts if fast[p] != catalog.part_info(p, t)]
    assert not wrong, wrong


def test_labelled_parts_restoring_a_type_are_left_to_pyarrow(zoo):
    """The fault: chrono's label kept, the Arrow schema restoring a duration (or an extension type)
    that DuckDB's Parquet types show as int64; the fast path vouched, pyarrow refused."""
    d = table_dir(zoo, "routing", "odd")
    parts = [(str(d / f"part-00010-{i:08d}.parquet"), "routing") for i in range(len(RELABELLED))]
    schemas, kvs = _footers(duckdb.connect(), [p for p, _ in parts])
    verdicts = {kind: catalog.part_info(p, t).readable for kind, (p, t) in zip(RELABELLED, parts)}
    assert not verdicts["duration"] and not verdicts["opaque_int64"]
    assert set(verdicts.values()) == {True, False}     # the zoo holds both of pyarrow's verdicts
    assert all(_vouch(t, schemas[p], kvs[p]) is None for p, t in parts)
    assert part_infos(duckdb.connect(), parts) == {p: catalog.part_info(p, t) for p, t in parts}


def test_chronos_own_and_plain_foreign_parts_are_vouched_for_without_pyarrow(zoo):
    """The fast path is taken (no silent fallback everywhere), and only where it is sure."""
    parts = _parts(zoo)
    schemas, kvs = _footers(duckdb.connect(), [p for p, _ in parts])
    vouched = {p for p, t in parts if _vouch(t, schemas.get(p), kvs.get(p, {})) is not None}
    names = {Path(p).name for p in vouched if "run_id=odd" in p}
    assert names == {"part-00000-00000000.parquet", "part-00009-00000012.parquet",
                     "part-00013-00000000.parquet"}, names   # the last: chrono's own Arrow schema, DuckDB-written
    own = [p for p, _ in parts if "run_id=odd" not in p and "v1-run" not in p]
    assert own and set(own) <= vouched      # every part chrono's writer wrote, compacted ones included
    for p, t in parts:                      # whatever was vouched for, pyarrow reads as readable
        if p in vouched:
            assert catalog.part_info(p, t).readable


def _reference_runs_table(root) -> str:
    """What ``chrono runs`` prints, computed over a full connection (every view, pyarrow footers)."""
    con = chrono.connect(root)
    rel = con.execute(RUNS_TABLE_SQL)
    cols = [d[0] for d in rel.description]
    rows = rel.fetchall()
    health = run_health(con)
    labels = [health[r[0]].label() if r[0] in health else OK for r in rows]
    out = io.StringIO()
    with redirect_stdout(out):
        print_table((cols[:1] + ["health"] + cols[1:], [r[:1] + (h,) + r[1:] for r, h in zip(rows, labels)]))
    return out.getvalue()


def test_runs_prints_what_the_full_connection_computes(zoo, capsys):
    expected = _reference_runs_table(zoo)
    assert main(["--root", str(zoo), "runs"]) == 0
    out = capsys.readouterr().out
    assert out == expected
    lines = {l.split()[0]: l.split() for l in out.splitlines()[1:]}
    assert set(lines) == {"alerting", "compacted", "calm", "v1-run", "odd"}
    assert lines["alerting"][1] != OK and lines["calm"][1] == OK and int(lines["alerting"][-3]) > 0


def test_subset_views_hold_the_same_rows_and_refresh_keeps_the_subset(zoo, tmp_path):
    zoo = Path(shutil.copytree(zoo, tmp_path / "zoo"))   # refresh below writes a part
    full, subset = chrono.connect(zoo), chrono.connect(zoo, tables=RUNS_TABLE_VIEWS)
    for t in RUNS_TABLE_VIEWS + ("runs",):
        q = f"SELECT * FROM {t} ORDER BY ALL"
        assert subset.execute(q).fetchall() == full.execute(q).fetchall(), t
        assert subset.execute(f"DESCRIBE {t}").fetchall() == full.execute(f"DESCRIBE {t}").fetchall(), t
    with pytest.raises(duckdb.CatalogException):
        subset.execute("SELECT * FROM tokens")
    with chrono.open_run(zoo, "calm") as w:   # refresh() rebuilds the same views, with the new part
        w.log_routing(1, 0, np.full(4, 2))
    chrono.refresh(subset)
    chrono.refresh(full)
    q = "SELECT count(*) FROM routing WHERE run_id = 'calm'"
    assert subset.execute(q).fetchall() == full.execute(q).fetchall() == [(8,)]
    with pytest.raises(duckdb.CatalogException):
        subset.execute("SELECT * FROM tokens")
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        chrono.connect(zoo, tables=("routing", "nope"))


def test_a_single_table_name_is_one_table_not_its_letters(tmp_path):
    """connect(tables="routing") once split the string into letters ("unknown table 'r'")."""
    import chrono

    with chrono.open_run(tmp_path, "r") as w:
        w.log_routing(0, 0, [3, 1])
    con = chrono.connect(tmp_path, tables="routing")
    assert con.execute("SELECT sum(tokens) FROM routing").fetchone()[0] == 4
