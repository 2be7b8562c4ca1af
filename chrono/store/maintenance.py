"""Whole-run maintenance: merging small parts (``compact``) and deleting a run (``delete_run``).

Both work through the same mechanisms as a writer: ``compact`` takes each
rank's writer lock (so it refuses a rank that is being written) and rewrites
with ``RunWriter.replace_table`` (crash-safe supersession). ``chrono rm`` takes
every writer lock before it calls ``delete_run``; ``chrono migrate`` lives with
the CLI.
"""
from __future__ import annotations

import os
import shutil

from ..schema import TABLES
from .catalog import part_files
from .layout import MANIFEST, PARTITION_KEY, legacy_run_dir, meta_dir, part_rank, read_manifest, \
    require_run, table_dirs


def compact(root, run: str, tables=None) -> dict[str, int]:
    """Merge each table's parts (per rank) into one part. Returns parts merged per table.

    Takes the run's writer lock for each rank it touches, so it refuses to run
    while that rank is being written (``StoreError``, as for an unknown run).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..schema import conform
    from .writer import RunWriter

    path = require_run(root, run)
    merged: dict[str, int] = {}
    ranks = sorted({part_rank(f) for t in TABLES for f in part_files(root, t, run)})
    # keep the run's world size in the manifest (RunWriter would write its default, 1)
    world_size = (read_manifest(path) or {}).get("world_size") or 1
    for rank in ranks:
        with RunWriter(root, run, rank=rank, world_size=world_size) as w:
            for table in (tables or TABLES):
                files = [f for f in part_files(root, table, run) if part_rank(f) == rank]
                if len(files) < 2:
                    continue
                data = pa.concat_tables([conform(table, pq.read_table(f)) for f in files])
                w.replace_table(table, data, parts=[os.path.basename(f) for f in files])
                merged[table] = merged.get(table, 0) + len(files)
    return merged


def delete_run(root, run_id: str) -> None:
    """Remove a run everywhere (metadata directory first, so it disappears from listings at once).

    Takes no lock: callers that may race a writer take them first (``chrono rm``).
    """
    for d in [meta_dir(root, run_id)] + [p for t in TABLES for p in table_dirs(root, t, run_id)]:
        shutil.rmtree(d, ignore_errors=True)
    legacy = legacy_run_dir(root, run_id)
    if (legacy / MANIFEST).is_file():
        # a legacy run may be named like a table ("routing") or "runs": keep other runs' partitions
        for entry in os.scandir(legacy):
            if not entry.name.startswith(f"{PARTITION_KEY}="):
                shutil.rmtree(entry.path, ignore_errors=True) if entry.is_dir(follow_symlinks=False) \
                    else os.unlink(entry.path)
        try:
            legacy.rmdir()
        except OSError:
            pass
