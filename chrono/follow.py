"""Following a store while it is written: which runs appeared or went, which parts changed.

Live readers (the dashboard, the Prometheus exporter's store source) poll a
``Follower`` and translate what changed into their own terms; they do not
watch the store themselves. Torch-free and cheap: a poll costs a directory
listing of the store's run metadata plus a few ``stat`` calls per run, and
re-lists a table's parts (``chrono.store.part_files``: temporary, unreadable
and superseded parts excluded) only when that table may have changed.

When may it have changed? A new part is a rename into the table's directory,
which moves the directory's mtime; so does the unlink of a part superseded by
``compact`` or ``RunWriter.truncate``. But two renames within one timestamp
tick leave the same mtime, so an unchanged stamp proves nothing while it is
recent: a listing is trusted only when it was taken at least ``fresh_s``
seconds after the directory's mtime (git's "racy index" rule); until then
every poll re-lists. The manifest is compared by content under the same rule.

A part is identified by path, size, mtime and inode, so a run deleted and
re-created under the same id between two polls (part names restart at 0)
still shows as changed parts. Not thread-safe: callers hold their own lock.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Iterable

from .schema import TABLES
from .store import MANIFEST, legacy_run_dir, list_runs, part_files, run_dir, table_dir, table_dirs

# A stamp younger than this (seconds) at listing time may hide a second change in the same
# tick: 1 s covers Linux's coarse clock (a few ms) and filesystems with 1 s mtimes.
FRESH_SECONDS = 1.0


@dataclass(frozen=True)
class Part:
    """One visible part file: ``path`` plus the stat fields that identify this version of it."""

    path: str
    size: int
    mtime_ns: int
    ino: int


@dataclass(frozen=True)
class RunChange:
    """What changed in one run since the previous poll.

    ``added`` / ``removed``: ``{table: (Part, ...)}`` of parts that became visible
    / stopped being visible (superseded by compaction or truncation, deleted),
    only tables with changes. ``manifest``: the manifest's content changed (or
    appeared). A run that appeared lists all its parts as added.
    """

    run: str
    added: dict = field(default_factory=dict)
    removed: dict = field(default_factory=dict)
    manifest: bool = False

    @property
    def tables(self) -> set[str]:
        """Tables whose visible parts changed."""
        return set(self.added) | set(self.removed)


@dataclass(frozen=True)
class Changes:
    """The result of one ``Follower.poll``: runs that ``appeared`` / are ``gone``, per-run changes."""

    appeared: tuple = ()
    gone: tuple = ()
    runs: dict = field(default_factory=dict)   # {run: RunChange}, only runs that changed

    def __bool__(self) -> bool:
        return bool(self.appeared or self.gone or self.runs)


@dataclass
class _Table:
    stamp: tuple = ()                 # mtime_ns (or None) of each directory that may hold parts
    trusted: bool = False             # listing taken >= fresh_s after the newest stamp
    parts: tuple = ()                 # (Part, ...) in part_files order


@dataclass
class _Run:
    manifest: tuple = ()              # (mtime_ns, size, ino) of the manifest, () when missing
    manifest_digest: str = ""
    manifest_trusted: bool = False
    tables: dict = field(default_factory=dict)   # {table: _Table}
    newest_ns: int = 0                # newest stamp of the manifest and table directories


def _stat_ns(path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _parts(root, table: str, run: str) -> tuple:
    out = []
    for p in part_files(root, table, run):
        try:
            st = os.stat(p)
        except OSError:   # superseded and unlinked between the listing and now
            continue
        out.append(Part(p, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class Follower:
    """Tracks a store's runs and their visible parts across ``poll()`` calls.

    ``root``: the store root. ``tables``: tables to follow (default: all).
    ``fresh_s``: the racy-stamp window above (default ``FRESH_SECONDS``; 0
    trusts every stamp at once: only for tests that need a poll to do
    nothing). A run is a directory with a manifest (``chrono.store.list_runs``);
    deleting a run removes its manifest first, so it is gone from the next
    poll on. Errors: none of its own; an unreadable directory reads as empty.
    """

    def __init__(self, root, tables: Iterable[str] = tuple(TABLES), fresh_s: float | None = None):
        self.root = root
        self.tables = tuple(tables)
        self.fresh_ns = int(float(FRESH_SECONDS if fresh_s is None else fresh_s) * 1e9)
        self._runs: dict[str, _Run] = {}
        self._versions: dict = {}   # {run or None: digest}, dropped when the run changes

    # ------------------------------------------------------------------ reading the result
    def runs(self) -> list[str]:
        """Runs followed as of the last poll, sorted."""
        return sorted(self._runs)

    def parts(self, run: str, table: str) -> tuple:
        """Visible parts ``(Part, ...)`` of ``run``'s ``table`` as of the last poll (() if unknown)."""
        r = self._runs.get(run)
        t = r.tables.get(table) if r is not None else None
        return t.parts if t is not None else ()

    def newest_ns(self, run: str) -> int:
        """Newest mtime (ns) of the run's manifest and table directories at the last poll (0 if unknown)."""
        r = self._runs.get(run)
        return r.newest_ns if r is not None else 0

    def version(self, run: str | None = None) -> str:
        """A digest that changes whenever what the run (None: any run) shows changes.

        Cached between polls: a page asking for it on every query pays one dict lookup.
        """
        v = self._versions.get(run)
        if v is None:
            h = hashlib.sha1()
            for name in ([run] if run is not None else sorted(self._runs)):
                h.update(f"run {name} {self._run_digest(name)}\n".encode())
            v = self._versions[run] = h.hexdigest()[:16]
        return v

    def _run_digest(self, run: str) -> str:
        key = ("run", run)
        v = self._versions.get(key)
        if v is None:
            h = hashlib.sha1()
            r = self._runs.get(run)
            if r is not None:
                h.update(f"manifest {r.manifest_digest}\n".encode())
                for table in sorted(r.tables):
                    for p in r.tables[table].parts:
                        h.update(f"{table} {p.path} {p.size} {p.mtime_ns} {p.ino}\n".encode())
            v = self._versions[key] = h.hexdigest()
        return v

    # ------------------------------------------------------------------ polling
    def stamps(self) -> dict[str, int]:
        """``{run: newest mtime ns}`` of every run in the store now: ``stat`` calls only, no listing.

        For choosing which runs to ``poll`` (e.g. the recently written ones).
        """
        out = {}
        for run in list_runs(self.root):
            manifest, dirs = self._paths(run)
            ns = [_stat_ns(manifest)] + [_stat_ns(d) for t in self.tables for d in dirs[t]]
            out[run] = max((n for n in ns if n is not None), default=0)
        return out

    def _paths(self, run: str):
        """(manifest path, {table: directories that may hold its parts}) of ``run``.

        The pre-hive (legacy) location is looked at only when the run has one: one ``stat``
        instead of one per table for every run of a current store.
        """
        legacy = legacy_run_dir(self.root, run)
        if os.path.isdir(legacy):
            manifest = run_dir(self.root, run) / MANIFEST
            if not manifest.is_file():
                manifest = legacy / MANIFEST
            return manifest, {t: table_dirs(self.root, t, run) for t in self.tables}
        return run_dir(self.root, run) / MANIFEST, {t: [table_dir(self.root, t, run)] for t in self.tables}

    def poll(self, runs: Iterable[str] | None = None) -> Changes:
        """Look at the store now; return what changed since the previous poll.

        ``runs``: follow exactly these runs (others are forgotten, reported in
        ``gone`` only if deleted); None follows every run in the store. A run
        given here that has no manifest is gone (or never appears).
        """
        present = set(list_runs(self.root))
        wanted = present if runs is None else {r for r in runs if r in present}
        gone = tuple(sorted(r for r in self._runs if r not in present))
        for r in set(self._runs) - wanted:
            del self._runs[r]
            self._forget_version(r)
        appeared, changed = [], {}
        for run in sorted(wanted):
            state = self._runs.get(run)
            if state is None:
                state = self._runs[run] = _Run()
                appeared.append(run)
                self._forget_version(run)
            change = self._poll_run(run, state)
            if change is not None:
                changed[run] = change
                self._forget_version(run)
        return Changes(tuple(appeared), gone, changed)

    def _forget_version(self, run: str) -> None:
        for key in (run, ("run", run), None):
            self._versions.pop(key, None)

    def _poll_run(self, run: str, state: _Run) -> RunChange | None:
        listed_at = time.time_ns()   # before any listing: a change after it is never trusted away
        path, dirs = self._paths(run)
        manifest = self._poll_manifest(path, state, listed_at)
        added, removed, newest = {}, {}, state.manifest[0] if state.manifest else 0
        for table in self.tables:
            t = state.tables.setdefault(table, _Table())
            stamp = tuple(_stat_ns(d) for d in dirs[table])
            top = max((n for n in stamp if n is not None), default=0)
            newest = max(newest, top)
            if stamp == t.stamp and t.trusted:
                continue
            parts = _parts(self.root, table, run)
            t.stamp, t.trusted = stamp, listed_at - top >= self.fresh_ns
            if parts != t.parts:
                old, new = set(t.parts), set(parts)
                if new - old:
                    added[table] = tuple(p for p in parts if p not in old)
                if old - new:
                    removed[table] = tuple(p for p in t.parts if p not in new)
                t.parts = parts
        state.newest_ns = newest
        if manifest or added or removed:
            return RunChange(run, added, removed, manifest)
        return None

    def _poll_manifest(self, path, state: _Run, listed_at: int) -> bool:
        """Whether the run's manifest content changed (stat first; content while the stamp is fresh)."""
        try:
            st = os.stat(path)
        except OSError:
            st = None
        sig = (st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else ()
        if sig == state.manifest and state.manifest_trusted:
            return False
        try:
            with open(path, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
        except OSError:
            digest = ""
        state.manifest, state.manifest_trusted = sig, bool(sig) and listed_at - sig[0] >= self.fresh_ns
        if digest == state.manifest_digest:
            return False
        state.manifest_digest = digest
        return True
