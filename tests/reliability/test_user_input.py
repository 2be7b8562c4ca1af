"""Bad user input: one-line error, exit code 2, nothing changed on disk."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import chrono
from chrono_cli.main import main as cli_main
from chrono.reader import QueryError, run_readonly_sql
from chrono.store import StoreError, validate_run_id


def tree_state(path) -> dict[str, str]:
    """Every file and directory under ``path`` with a hash of its content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            out[os.path.join(dirpath, d)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def world(tmp_path):
    """A store with one run, plus secrets outside the root that SQL must not reach."""
    root = tmp_path / "store"
    with chrono.open_run(root, "r") as w:
        w.log_routing(0, 0, np.ones(4))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("a,b\n1,2\n")
    pq.write_table(pa.table({"a": [1]}), outside / "secret.parquet")
    return root, outside


BAD_RUN_IDS = ["../outside", "../../etc", "/etc", "a/b", "..", ".", "", "x" * 129, "run\n", "a b",
               "ü", "a\\b", "r\x00", "r/../r", "~root", "$HOME", "r*", "r?"]


@pytest.mark.parametrize("run_id", BAD_RUN_IDS)
def test_malformed_run_ids_are_refused_everywhere(world, capsys, run_id):
    root, outside = world
    before = tree_state(root.parent)
    with pytest.raises(StoreError, match="invalid run id"):
        validate_run_id(run_id)
    with pytest.raises(StoreError):
        chrono.open_run(root, run_id)
    with pytest.raises(StoreError):
        chrono.read(root, "routing", run=run_id)
    for cmd in (["show", run_id], ["alerts", run_id], ["compact", run_id], ["snapshot", run_id]):
        assert cli_main(["--root", str(root), *cmd]) == 2, cmd
        err = capsys.readouterr().err
        assert err.startswith("chrono: error:") and err.count("\n") == 1, err
    assert tree_state(root.parent) == before


def _sql_attacks(root, outside):
    return [
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO routing SELECT * FROM routing",
        "DROP VIEW routing",
        "SELECT 1; DROP VIEW routing",
        f"COPY routing TO '{outside}/dump.csv'",
        f"COPY (SELECT 1) TO '{root}/r/routing/part-00000-00000099.parquet' (FORMAT parquet)",
        f"ATTACH '{outside}/x.db' AS x",
        "ATTACH ':memory:' AS m",
        f"EXPORT DATABASE '{outside}/exp'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "RESET lock_configuration",
        f"PRAGMA profile_output = '{outside}/profile.json'",
        "CHECKPOINT",
        "CREATE MACRO m(x) AS x",
        f"SELECT * FROM read_csv('{outside}/secret.csv')",
        f"SELECT * FROM '{outside}/secret.parquet'",
        f"SELECT * FROM read_parquet('{root}/../outside/secret.parquet')",
        f"SELECT * FROM read_text('{root}/r/../../outside/secret.csv')",
        f"SELECT * FROM read_blob('{outside}/secret.csv')",
        f"SELECT * FROM glob('{outside}/*')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_csv('https://example.com/x.csv')",
        "SELECT getenv('HOME')",
        "",
        "SELEC broken",
    ]


def test_sql_that_writes_attaches_or_reads_outside_root_is_refused(world, capsys):
    root, outside = world
    before = tree_state(root.parent)
    con = chrono.connect(root)
    for sql in _sql_attacks(root, outside):
        with pytest.raises(QueryError):
            run_readonly_sql(con, sql)
        assert cli_main(["--root", str(root), "query", sql]) == 2, sql
        err = capsys.readouterr().err
        assert err.startswith("chrono: error:") and err.count("\n") == 1, (sql, err)
    # the connection still works after all of that, and so does reading inside the root
    assert run_readonly_sql(con, "SELECT count(*) AS n FROM routing").to_pylist() == [{"n": 4}]
    assert run_readonly_sql(con, f"SELECT count(*) AS n FROM '{root}/routing/run_id=r/*.parquet'").to_pylist() \
        == [{"n": 4}]
    assert tree_state(root.parent) == before


def test_huge_query_is_capped(world, capsys):
    root, _ = world
    con = chrono.connect(root)
    # the dashboard passes a limit: a trillion-row query returns at once with `limit` rows
    assert run_readonly_sql(con, "SELECT * FROM range(1000000000000)", limit=1000).num_rows == 1000
    # the CLI's table output fetches --max-rows + 1 rows, never the whole result
    assert cli_main(["--root", str(root), "query", "SELECT * FROM range(1000000000000)",
                     "--max-rows", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:6] == ["0", "1", "2", "3", "4"] and out[6].startswith("... more rows not shown")


BAD_ARGS = [
    ["--bogus"],
    ["nosuchcommand"],
    ["query"],
    ["query", "SELECT 1", "--bogus"],
    ["query", "SELECT 1", "--format", "xml"],
    ["query", "SELECT 1", "--max-rows", "0"],
    ["query", "SELECT 1", "--max-rows", "many"],
    ["query", "SELECT 1", "--format", "parquet"],
    ["query", "SELECT 1", "--output", "/nonexistent-dir/x.csv"],
    ["show"],
    ["show", "r", "extra"],
    ["show", "nosuchrun"],
    ["snapshot", "r", "--every", "0"],
    ["snapshot", "r", "--every", "-3"],
    ["snapshot", "r", "--every", "ten"],
    ["alerts", "nosuchrun"],
    ["compact", "nosuchrun"],
]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=lambda a: " ".join(a) or "empty")
def test_bad_cli_arguments(world, capsys, argv):
    root, _ = world
    before = tree_state(root.parent)
    try:
        code = cli_main(["--root", str(root), *argv])
    except SystemExit as e:  # argparse errors exit through SystemExit
        code = e.code
    assert code == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("chrono: error:") and err.count("\n") == 1, err
    assert tree_state(root.parent) == before
