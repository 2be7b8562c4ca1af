"""``chrono rm RUN [--yes]``: delete a run everywhere in the store.

Removes the run's metadata directory (manifest, ``control_decisions.jsonl``,
control config, writer locks) and its partition of every table (routing,
tokens, snapshots, alerts, decisions, signals, lifecycle), in the current and
the pre-hive layout (``chrono.store.delete_run``).

A run that a live writer holds is refused: every ``.writer-<rank>.lock`` of
the run is taken (``chrono.store.locks``, non-blocking) before anything is deleted and held
until the deletion is done, so a writer cannot start on the run half-way
through. A held lock means a process (training, ``chrono snapshot``, ...) is
writing it: one error line naming the holder, exit 2, nothing deleted.
Imports no torch.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def register(sub) -> None:
    s = sub.add_parser(
        "rm", help="delete a run everywhere in the store (refuses a run being written)",
        description="Delete RUN: its manifest and metadata and its rows in every table "
                    "(routing, tokens, snapshots, alerts, decisions, signals, lifecycle). "
                    "Refuses while a writer (a training process, chrono snapshot, ...) holds the run. "
                    "Asks for confirmation on a terminal unless --yes is given; without a terminal, "
                    "--yes is required.")
    s.add_argument("run")
    s.add_argument("--yes", "-y", action="store_true", help="delete without asking")
    s.set_defaults(func=cmd_rm)


def _lock_files(root, run: str) -> list[Path]:
    """Every writer lock file of the run (current metadata directory and legacy directory)."""
    from chrono.store import legacy_run_dir, run_dir
    from chrono.store.locks import is_lock_name

    out = []
    for d in (run_dir(root, run), legacy_run_dir(root, run)):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        out += [d / n for n in names if is_lock_name(n)]
    return out


@contextlib.contextmanager
def hold_writer_locks(root, run: str):
    """Take every writer lock of ``run`` for the duration of the block.

    Raises ``chrono.store.StoreError`` (naming the lock and its pid@host) when
    one is held by a live writer; nothing is held afterwards in that case.
    """
    from chrono.store import StoreError
    from chrono.store.locks import holder, try_lock

    held = []
    try:
        for path in _lock_files(root, run):
            if not path.exists():   # its writer closed and the run went away meanwhile
                continue
            who = holder(path)      # read first: filelock < 4.3 empties the file on a refused try
            try:
                lock = try_lock(path)
            except OSError as e:   # e.g. another user's lock file: refuse, one line
                raise StoreError(f"cannot take {path} ({e.strerror or e}); nothing was deleted") from None
            if lock is None:
                by = f" by {who}" if who else ""
                raise StoreError(f"run {run!r} is being written{by} ({path.name} held); "
                                 f"stop that writer first, nothing was deleted")
            held.append(lock)
        yield
    finally:
        for lock in held:
            lock.release()


def _summary(root, run: str) -> str:
    from chrono.schema import TABLES
    from chrono.store import part_files

    n = sum(len(part_files(root, t, run)) for t in TABLES)
    return f"{n} part file{'s' if n != 1 else ''}"


def cmd_rm(args) -> int:
    from chrono_cli.common import UserError
    from chrono.store import delete_run, require_run

    root, run = Path(args.root), args.run
    require_run(root, run)   # unknown run / invalid id: StoreError, one line, exit 2
    with hold_writer_locks(root, run):
        what = _summary(root, run)
        if not args.yes:
            if not sys.stdin.isatty():
                raise UserError(f"refusing to delete run {run!r} without confirmation: pass --yes")
            answer = input(f"delete run {run!r} ({what}) under {root}? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("nothing deleted")
                return 1
        delete_run(root, run)
    print(f"deleted run {run} ({what})")
    return 0
