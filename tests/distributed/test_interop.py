"""Other engines read the store unchanged: PySpark (local mode), Polars, DuckDB (DESIGN §8).

The store is written the way a 2-rank job writes it (one ``RunWriter`` per
rank, ``part-<rank>-<seq>`` files, a ``rank`` column), one run compacted, and
the per-(run, layer, expert) sums every engine computes must agree. Each
engine is pointed at a table directory (``<root>/routing``) and discovers the
``run_id=<run>`` partitions itself, the way it reads any hive-partitioned
dataset; a filter on ``run_id`` prunes whole partitions. One run id looks
like a number ("2024") and must stay a string.
"""
from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

import chrono
from chrono.store import compact, part_files

from tests.conftest import require_tool

pytestmark = [pytest.mark.distributed,
              pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")]

LAYERS, E, STEPS = 3, 6, 4
RUNS = {"alpha": 0, "beta": 10, "2024": 20}   # run id -> seed base


def _write_rank(root, run, rank, seed):
    rng = np.random.default_rng(seed)
    with chrono.open_run(root, run, model={"layers": list(range(LAYERS))}, rank=rank, world_size=2) as w:
        for step in range(STEPS):
            w.log_routing(step, np.arange(LAYERS), rng.integers(0, 50, size=(LAYERS, E)))
            w.flush()      # one part per step: many small parts, as a real run has


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop") / "store"
    for run, base in RUNS.items():
        for rank in (0, 1):
            _write_rank(root, run, rank, base + rank)
    before = len(part_files(root, "routing", "beta"))
    merged = compact(root, "beta")
    assert merged["routing"] == before
    after = part_files(root, "routing", "beta")
    # compaction keeps the layout: one part per rank, still part-<rank>-<seq> in routing/run_id=beta/
    assert sorted(os.path.basename(f)[:11] for f in after) == ["part-00000-", "part-00001-"]
    assert {os.path.dirname(f) for f in after} == {str(root / "routing" / "run_id=beta")}
    return root


def duckdb_sums(root) -> dict:
    con = chrono.connect(root)
    rows = con.sql("SELECT run_id, layer, expert, sum(tokens)::BIGINT AS n FROM routing GROUP BY ALL"
                   ).to_arrow_table().to_pylist()
    return {(r["run_id"], r["layer"], r["expert"]): r["n"] for r in rows}


@pytest.fixture(scope="module")
def spark():
    require_tool("java")
    pyspark_sql = pytest.importorskip("pyspark.sql")
    s = (pyspark_sql.SparkSession.builder.master("local[1]").appName("chrono-interop")
         .config("spark.ui.enabled", "false")
         .config("spark.sql.shuffle.partitions", "1")
         .config("spark.driver.memory", "512m")
         .config("spark.sql.session.timeZone", "UTC")
         .getOrCreate())
    yield s
    s.stop()


def test_duckdb_sees_both_ranks(store):
    con = chrono.connect(store)
    ranks = con.sql("SELECT DISTINCT run_id, rank FROM routing ORDER BY ALL").to_arrow_table().to_pylist()
    assert ranks == [{"run_id": r, "rank": k} for r in sorted(RUNS) for k in (0, 1)]


@pytest.mark.slow   # starts a JVM
def test_spark_counts_equal_duckdb(store, spark):
    expected = duckdb_sums(store)
    df = spark.read.parquet(str(store / "routing"))     # partition discovery finds run_id=<run>
    assert {"run_id", "layer", "expert", "tokens", "rank"} <= set(df.columns)
    assert dict(df.dtypes)["run_id"] == "string"        # "2024" is not inferred as a number
    rows = df.groupBy("run_id", "layer", "expert").sum("tokens").collect()
    got = {(r["run_id"], r["layer"], r["expert"]): r["sum(tokens)"] for r in rows}
    assert got == expected
    assert len(got) == len(RUNS) * LAYERS * E
    one = df.where(df.run_id == "2024")
    plan = one._jdf.queryExecution().executedPlan().toString()
    assert "PartitionFilters: [isnotnull(run_id" in plan and "(run_id#" in plan   # pruned by directory
    assert one.groupBy().sum("tokens").collect()[0][0] == \
        sum(n for (run, _, _), n in expected.items() if run == "2024")
    # the exact file list chrono's reader uses (excludes parts superseded by a compaction
    # that crashed before deleting them) gives the same answer
    exact = spark.read.parquet(*part_files(store, "routing"))
    assert exact.groupBy().sum("tokens").collect()[0][0] == sum(expected.values())


def test_plain_duckdb_glob_recipe_equals_the_chrono_reader(store):
    """The docs' object-storage recipe (read_parquet over a hive glob), here on a local path."""
    import duckdb
    src = (f"read_parquet('{store}/routing/*/*.parquet', hive_partitioning = true, "
           f"union_by_name = true)")
    rows = duckdb.sql(f"SELECT run_id, layer, expert, sum(tokens)::BIGINT AS n FROM {src} GROUP BY ALL"
                      ).fetchall()
    assert {(r, l, e): n for r, l, e, n in rows} == duckdb_sums(store)
    assert {type(r) for r, *_ in rows} == {str}
    plan = duckdb.sql(f"EXPLAIN ANALYZE SELECT sum(tokens) FROM {src} WHERE run_id = 'beta'").fetchall()
    text = "\n".join(str(c) for row in plan for c in row)
    n_files = len(part_files(store, "routing"))
    assert f"Scanning Files: 2/{n_files}" in text     # only beta's two compacted parts are opened


def test_duckdb_recipe_over_an_object_store_filesystem(store):
    """The same recipe through a non-local filesystem: the store is copied, key by key, into an
    fsspec in-memory object store (no real directories, listing by prefix, like S3) that DuckDB
    reads through ``register_filesystem``. The real S3 spelling needs DuckDB's httpfs
    extension, which is downloaded on first use and so cannot run here."""
    import duckdb
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    for table in ("routing", "snapshots"):
        for f in part_files(store, table):
            key = os.path.relpath(f, store)              # routing/run_id=<run>/part-....parquet
            fs.pipe(f"/bucket/chrono_runs/{key}", open(f, "rb").read())
    con = duckdb.connect()
    con.register_filesystem(fs)
    try:
        src = ("read_parquet('memory://bucket/chrono_runs/routing/*/*.parquet', "
               "hive_partitioning = true, union_by_name = true)")
        rows = con.sql(f"SELECT run_id, layer, expert, sum(tokens)::BIGINT AS n FROM {src} GROUP BY ALL"
                       ).fetchall()
        assert {(r, l, e): n for r, l, e, n in rows} == duckdb_sums(store)
        plan = con.sql(f"EXPLAIN ANALYZE SELECT sum(tokens) FROM {src} WHERE run_id = '2024'").fetchall()
        n_2024 = len(part_files(store, "routing", "2024"))
        assert f"Scanning Files: {n_2024}/{len(part_files(store, 'routing'))}" in \
            "\n".join(str(c) for row in plan for c in row)
    finally:
        fs.store.clear()
        con.close()


def test_polars_counts_equal_duckdb(store):
    expected = duckdb_sums(store)
    raw = (pl.scan_parquet(store / "routing", hive_partitioning=True)
           .group_by("run_id", "layer", "expert").agg(pl.col("tokens").sum()).collect())
    got = {(r["run_id"], r["layer"], r["expert"]): r["tokens"] for r in raw.iter_rows(named=True)}
    assert got == expected
    via_chrono = (chrono.read(store, "routing", run="beta").group_by("layer", "expert")
                  .agg(pl.col("tokens").sum()).collect())
    assert {(r["layer"], r["expert"]): r["tokens"] for r in via_chrono.iter_rows(named=True)} == \
        {(l, e): n for (run, l, e), n in expected.items() if run == "beta"}
