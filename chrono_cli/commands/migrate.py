"""``chrono migrate``: move runs into the current layout and rewrite old-schema parts.

Layout: runs written before the hive layout (``<root>/<run>/<table>/part-*``)
are moved to ``<root>/<table>/run_id=<run>/`` and their manifest and other
files to ``<root>/runs/run_id=<run>/``, file by file with ``os.replace``. The
manifest is copied first and the legacy one removed last; readers look in
both places, so an interrupted move shows every row exactly once and the next
``chrono migrate`` finishes it.

Readers already accept every older version (missing columns read as their
default, ``chrono.schema.COLUMN_DEFAULTS``), so migrating is never required to
read a store; it makes the files themselves current, for tools that read the
Parquet directly (Spark, Trino, pandas) and do not know chrono's defaults.

Safe to interrupt: each rewrite is ``RunWriter.replace_table`` (a new part that
names the parts it supersedes, then the old files are deleted), under the
run's writer lock, so a run being written is refused, not corrupted. Imports no torch.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

PART_VERSION_KEY = b"chrono.schema_version"


@dataclass
class RunPlan:
    run: str
    manifest_version: int | None
    legacy_layout: bool = False
    # (table, rank) -> [(part name, its schema version)]
    parts: dict = field(default_factory=dict)

    @property
    def n_parts(self) -> int:
        return sum(len(v) for v in self.parts.values())


def _part_version(path: str, table: str) -> int | None:
    """Schema version of a part: None when it is current, else its (older) version."""
    import pyarrow.parquet as pq

    from chrono.schema import SCHEMA_VERSION, table_schema

    md = pq.read_metadata(path)
    kv = md.metadata or {}
    try:
        v = int(kv.get(PART_VERSION_KEY, b"0"))
    except ValueError:
        v = 0
    missing = set(table_schema(table).names) - set(md.schema.names)
    if v >= SCHEMA_VERSION and not missing:
        return None
    return v


def plan(root) -> list[RunPlan]:
    """What ``migrate`` would rewrite: per run, the live parts older than the current version."""
    from chrono.schema import SCHEMA_VERSION, TABLES
    from chrono.store import PART_RE, is_legacy_run, list_runs, part_files, run_manifest

    out = []
    for run in list_runs(root):
        m = run_manifest(root, run)
        p = RunPlan(run, m.get("schema_version"), is_legacy_run(root, run))
        for table in TABLES:
            for f in part_files(root, table, run):  # readable, not superseded
                v = _part_version(f, table)
                if v is not None:
                    rank = int(PART_RE.match(os.path.basename(f)).group(1))
                    p.parts.setdefault((table, rank), []).append((os.path.basename(f), v))
        if p.n_parts or (p.manifest_version or 0) < SCHEMA_VERSION or p.legacy_layout:
            out.append(p)
    return out


def move_layout(root, run: str) -> int:
    """Move one legacy run into the hive layout. Returns the part files moved.

    Refuses (StoreError) while an older chrono still writes the run (its
    writer lock in the legacy directory is held).
    """
    import shutil

    from chrono.schema import TABLES
    from chrono.store import (MANIFEST, PART_RE, PARTITION_KEY, StoreError, _atomic_write_bytes,
                              legacy_run_dir, run_dir, table_dir)
    from chrono.store.locks import is_lock_name as is_lock, try_lock

    legacy, meta = legacy_run_dir(root, run), run_dir(root, run)

    locks = []
    try:
        for entry in (os.scandir(legacy) if legacy.is_dir() else []):
            if is_lock(entry.name):
                lock = try_lock(entry.path)
                if lock is None:
                    raise StoreError(f"run {run!r} is being written (lock {entry.path} held); "
                                     f"stop its writer, then migrate")
                locks.append(lock)
        meta.mkdir(parents=True, exist_ok=True)
        if (legacy / MANIFEST).is_file() and not (meta / MANIFEST).is_file():
            _atomic_write_bytes(meta / MANIFEST, (legacy / MANIFEST).read_bytes())
        moved = 0
        for table in TABLES:
            src = legacy / table
            if not src.is_dir():
                continue
            dst = table_dir(root, table, run)
            dst.mkdir(parents=True, exist_ok=True)
            for name in sorted(os.listdir(src)):
                if PART_RE.match(name):
                    if (dst / name).exists():
                        raise StoreError(f"cannot move {src / name}: {dst / name} exists")
                    os.replace(src / name, dst / name)
                    moved += 1
                elif name.endswith(".parquet.tmp"):   # a killed writer's half file
                    os.unlink(src / name)
            if not os.listdir(src):
                src.rmdir()
        # everything else the run kept (control_decisions.jsonl, checkpoints, ...) joins the manifest
        for entry in (list(os.scandir(legacy)) if legacy.is_dir() else []):
            name = entry.name
            if name in TABLES or name == MANIFEST or name.startswith(f"{PARTITION_KEY}=") or is_lock(name):
                continue
            if not (meta / name).exists():
                shutil.move(entry.path, meta / name)
        (legacy / MANIFEST).unlink(missing_ok=True)
        for lock in locks:
            os.unlink(lock.lock_file)
    finally:
        for lock in locks:
            lock.release()
    try:
        legacy.rmdir()   # only if empty: a legacy run named like a table keeps that table's partitions
    except OSError:
        pass
    return moved


def apply(root, plans: list[RunPlan], progress=None) -> int:
    """Rewrite every planned part into the current schema. Returns parts rewritten."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from chrono.schema import conform
    from chrono.store import RunWriter, run_manifest

    done = 0
    for p in plans:
        if p.legacy_layout:
            move_layout(root, p.run)
        old = run_manifest(root, p.run)
        ranks = sorted({rank for (_, rank) in p.parts} | {0})  # rank 0 also bumps the manifest
        for rank in ranks:
            with RunWriter(root, p.run, rank=rank, world_size=old.get("world_size") or 1) as w:
                if rank == 0 and old.get("host"):
                    w.update_manifest(host=old["host"])  # the run's host, not the migrating one
                for (table, r), parts in sorted(p.parts.items()):
                    if r != rank:
                        continue
                    names = [n for n, _ in parts]
                    data = pa.concat_tables([conform(table, pq.read_table(w.table_dir(table) / n))
                                             for n in names])
                    w.replace_table(table, data, parts=names)
                    done += len(names)
                    if progress:
                        progress(len(names))
    return done


def cmd_migrate(args) -> int:
    from tqdm import tqdm

    from chrono_cli.common import UserError
    from chrono.schema import SCHEMA_HISTORY, SCHEMA_VERSION

    root = Path(args.root)
    if not root.is_dir():
        raise UserError(f"store root {root} does not exist")
    plans = plan(root)
    if not plans:
        print(f"{root}: every run is in the current layout at schema version {SCHEMA_VERSION}; "
              f"nothing to do")
        return 0
    for p in plans:
        tables = ", ".join(f"{t} rank {r}: {len(v)} parts (v{min(x for _, x in v)})"
                           for (t, r), v in sorted(p.parts.items())) or "no parts"
        move = f"move {root / p.run} into the hive layout; " if p.legacy_layout else ""
        print(f"run {p.run}: {move}manifest v{p.manifest_version} -> v{SCHEMA_VERSION}; {tables}")
    changes = "; ".join(f"v{v}: {SCHEMA_HISTORY[v]}" for v in sorted(SCHEMA_HISTORY)
                        if v > min((p.manifest_version or 1) for p in plans))
    if changes:
        print(f"changes: {changes}")
    total = sum(p.n_parts for p in plans)
    if args.dry_run:
        moves = sum(p.legacy_layout for p in plans)
        print(f"dry run: {len(plans)} runs, {moves} to move, {total} parts would be rewritten; "
              f"nothing changed")
        return 0
    with tqdm(total=total, unit="part", desc="migrating", file=sys.stderr, disable=None) as bar:
        n = apply(root, plans, progress=bar.update)
    print(f"migrated {len(plans)} runs, {n} parts rewritten to schema version {SCHEMA_VERSION}")
    return 0


def register(sub) -> None:
    import argparse

    s = sub.add_parser("migrate", help="upgrade runs written by an older chrono (layout, schema)",
                       description="Move runs stored in the pre-hive layout (<root>/<run>/<table>/) "
                       "to <root>/<table>/run_id=<run>/, rewrite parts written by an older schema "
                       "version into the current one and bump the run manifests (see "
                       "docs/reliability.md). Readers "
                       "accept old versions anyway; this makes the Parquet files current for other "
                       "tools. Refuses runs that are being written; safe to interrupt.")
    s.add_argument("--root", default=argparse.SUPPRESS,
                   help="store root (same as the global --root)")
    s.add_argument("--dry-run", action="store_true", help="only print what would be rewritten")
    s.set_defaults(func=cmd_migrate)
