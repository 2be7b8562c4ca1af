"""A store written in schema version 1 and in the pre-hive layout (committed
fixture: ``<root>/<run>/<table>/part-*``) stays readable, and ``chrono migrate``
moves it into the hive layout and upgrades it without changing what readers see."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import chrono
import chrono.store as store
from chrono_cli.main import main as cli_main
from chrono.schema import SCHEMA_VERSION, TABLES, schema_for, table_schema

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store_v1"
RUN = "v1-run"


@pytest.fixture
def v1_root(tmp_path):
    root = tmp_path / "store"
    shutil.copytree(FIXTURE, root)  # never touch the committed fixture
    return root


def _everything(root) -> dict:
    con = chrono.connect(root)
    out = {t: sorted(map(repr, con.sql(f"SELECT * FROM {t}").fetchall())) for t in TABLES}
    out["polars_routing"] = chrono.read(root, "routing").collect().sort(["rank", "step", "layer", "expert"])
    return out


def _tree(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_fixture_is_a_real_version_1_store():
    assert SCHEMA_VERSION == 2
    assert "dropped" not in schema_for("routing", 1).names and "dropped" in table_schema("routing").names
    assert json.loads((FIXTURE / RUN / "manifest.json").read_text())["schema_version"] == 1
    parts = sorted((FIXTURE / RUN / "routing").glob("part-*.parquet"))
    assert len(parts) == 4
    for p in parts:
        assert pq.read_schema(p).names == schema_for("routing", 1).names
        assert pq.read_metadata(p).metadata[b"chrono.schema_version"] == b"1"


def test_version_1_store_is_readable_by_current_readers(v1_root):
    assert store.is_legacy_run(v1_root, RUN)
    raw = [pq.read_table(p) for p in sorted((v1_root / RUN / "routing").glob("part-*.parquet"))]
    raw_tokens = sum(t.column("tokens").to_numpy().sum() for t in raw)
    raw_rows = sum(t.num_rows for t in raw)
    con = chrono.connect(v1_root)
    assert con.sql("SELECT count(*), sum(tokens), count(dropped), sum(dropped) FROM routing").fetchall() \
        == [(raw_rows, raw_tokens, raw_rows, 0)]  # the missing column reads as its default, 0
    assert con.sql("SELECT schema_version FROM runs").fetchall() == [(1,)]
    assert con.sql("SELECT count(*) FROM signals").fetchall() == [(10,)]
    lf = chrono.read(v1_root, "routing").collect()
    assert lf.height == raw_rows and lf["dropped"].sum() == 0 and lf["dropped"].null_count() == 0
    for cmd in (["runs"], ["show", RUN], ["alerts", RUN]):
        assert cli_main(["--root", str(v1_root), *cmd]) == 0


def test_migrate_dry_run_changes_nothing(v1_root, capsys):
    before = _tree(v1_root)
    assert cli_main(["migrate", "--root", str(v1_root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 to move, 6 parts would be rewritten" in out and "routing.dropped" in out
    assert "into the hive layout" in out
    assert _tree(v1_root) == before


def test_migrate_upgrades_and_readers_see_the_same_data(v1_root, capsys):
    before = _everything(v1_root)
    assert cli_main(["--root", str(v1_root), "migrate"]) == 0
    assert "migrated 1 runs, 6 parts" in capsys.readouterr().out
    after = _everything(v1_root)
    assert before.pop("polars_routing").equals(after.pop("polars_routing"))
    assert before == after
    assert not (v1_root / RUN).exists() and not store.is_legacy_run(v1_root, RUN)   # moved, nothing left
    parts = sorted(v1_root.glob(f"*/run_id={RUN}/part-*.parquet"))
    assert {p.parent.parent.name for p in parts} == {"routing", "snapshots", "signals"}
    for p in parts:
        table = p.parent.parent.name
        assert pq.read_schema(p).names == table_schema(table).names
        assert pq.read_metadata(p).metadata[b"chrono.schema_version"] == str(SCHEMA_VERSION).encode()
    manifest = json.loads((store.meta_dir(v1_root, RUN) / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["world_size"] == 2
    assert manifest["model"]["name"] == "fixture"  # kept
    assert cli_main(["--root", str(v1_root), "migrate"]) == 0  # idempotent
    assert "nothing to do" in capsys.readouterr().out


def test_writer_refuses_a_legacy_run_and_points_to_migrate(v1_root):
    with pytest.raises(store.StoreError, match="pre-hive layout.*chrono migrate"):
        chrono.open_run(v1_root, RUN)


def test_migrate_refuses_a_legacy_run_an_older_chrono_is_writing(v1_root, capsys):
    before = _tree(v1_root)
    lock = open(v1_root / RUN / ".writer-1.lock", "a+")   # what an older writer of rank 1 holds
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert cli_main(["--root", str(v1_root), "migrate"]) == 2
    finally:
        lock.close()
    err = capsys.readouterr().err
    assert "is being written" in err and err.count("\n") == 1
    after = _tree(v1_root)
    after.pop(f"{RUN}/.writer-1.lock"), before.pop(f"{RUN}/.writer-1.lock", None)
    assert after == before   # nothing moved before the lock was checked
    assert cli_main(["--root", str(v1_root), "migrate"]) == 0   # finishes once the writer is gone


def test_migrate_refuses_a_run_being_written(v1_root, capsys):
    from chrono_cli.commands.migrate import move_layout

    assert move_layout(v1_root, RUN) == 6   # layout first; the schema upgrade is still to do
    with chrono.open_run(v1_root, RUN, rank=1, world_size=2):
        assert cli_main(["--root", str(v1_root), "migrate"]) == 2
    err = capsys.readouterr().err
    assert "already being written" in err and err.count("\n") == 1
    # rank 0 went first and was migrated; rank 1's parts are untouched and still readable
    rank1 = list(store.table_dir(v1_root, "routing", RUN).glob("part-00001-*.parquet"))
    assert rank1 and all(pq.read_schema(p).names == schema_for("routing", 1).names for p in rank1)
    assert chrono.connect(v1_root).sql("SELECT count(*) FROM routing").fetchall() == [(160,)]
    assert cli_main(["--root", str(v1_root), "migrate"]) == 0  # finishes once the writer is gone


def test_migrate_interrupted_before_old_parts_are_deleted_shows_no_duplicates(v1_root, monkeypatch, capsys):
    from chrono_cli.commands.migrate import move_layout

    before = _everything(v1_root)
    move_layout(v1_root, RUN)   # the layout move (its own crash points are tested below)
    monkeypatch.setattr(os, "unlink", lambda *a, **k: None)  # "crash" before the deletes
    assert cli_main(["--root", str(v1_root), "migrate"]) == 0
    monkeypatch.undo()
    assert len(list(store.table_dir(v1_root, "routing", RUN).glob("part-*.parquet"))) == 6  # old + new
    after = _everything(v1_root)
    assert before.pop("polars_routing").equals(after.pop("polars_routing"))
    assert before == after


@pytest.mark.parametrize("moves_before_crash", [0, 1, 3, 5])
def test_layout_move_interrupted_midway_loses_and_duplicates_nothing(v1_root, monkeypatch, moves_before_crash):
    """A crash at any point of the file-by-file move: readers see every row exactly once
    (they read the partition and the legacy directory), and the next migrate finishes."""
    import chrono_cli.commands.migrate as migrate

    before = _everything(v1_root)
    real, calls = os.replace, []

    def crashing_replace(src, dst):
        if len(calls) == moves_before_crash:
            raise OSError(5, "simulated crash", str(src))
        calls.append(src)
        real(src, dst)

    monkeypatch.setattr(migrate.os, "replace", crashing_replace)
    with pytest.raises(OSError):
        migrate.move_layout(v1_root, RUN)
    monkeypatch.undo()
    assert len(calls) == moves_before_crash
    after = _everything(v1_root)
    assert before.pop("polars_routing").equals(after.pop("polars_routing"))
    assert before == after
    assert cli_main(["--root", str(v1_root), "migrate"]) == 0
    assert not (v1_root / RUN).exists()
    assert chrono.connect(v1_root).sql("SELECT count(*) FROM routing").fetchall() == [(160,)]


def test_migrate_on_missing_root_is_a_user_error(tmp_path, capsys):
    assert cli_main(["--root", str(tmp_path / "nope"), "migrate"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "nope").exists()
