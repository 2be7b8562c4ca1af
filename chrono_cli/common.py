"""What the ``chrono`` commands share: the user-error type, table printing, hints.

Imports nothing beyond the standard library, so the parser and ``--help`` stay
cheap; every command module imports from here, never from ``chrono_cli.main``.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake by the user: reported as one line ``chrono: error: ...``, exit code 2."""


def plural(n: int, noun: str, many: str | None = None) -> str:
    """'1 alert', '0 alerts', '3 alerts' (``many`` for irregular plurals)."""
    return f"{n:,} {noun if n == 1 else (many or noun + 's')}"


def invocation() -> str:
    """How to run chrono again from the user's shell, for printed hints.

    'chrono' when that name on $PATH is this installation; otherwise the path the
    user started it by (``.venv/bin/chrono`` after ``make demo``, relative when
    under the current directory); otherwise ``python -m chrono_cli``.
    """
    def same(a, b) -> bool:
        try:
            return Path(a).resolve() == Path(b).resolve()
        except OSError:
            return False

    on_path = shutil.which("chrono")
    candidates = [Path(sys.argv[0])] if Path(sys.argv[0]).name == "chrono" else []
    candidates.append(Path(sys.prefix) / "bin" / "chrono")
    for exe in candidates:
        if exe.is_file():
            if on_path and same(on_path, exe):
                return "chrono"
            rel = os.path.relpath(exe.absolute())
            return rel if not rel.startswith("..") else str(exe.absolute())
    return f"{sys.executable} -m chrono_cli"


def require_store(root) -> Path:
    """``root`` as a Path if it is a directory; a UserError saying the store does not exist otherwise."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise UserError(f"store {root} {what} (set --root or $CHRONO_ROOT; "
                        f"'{invocation()} --root {root} demo --no-serve' records a first run there)")
    return root


def refuse_inside_store(path, root, option: str) -> None:
    """UserError when ``path`` (a file or directory a command writes) lies inside the store
    ``root`` (symlinks followed): chrono alone writes the store."""
    if Path(path).resolve().is_relative_to(Path(root).resolve()):
        raise UserError(f"{option} {path} is inside the store {root}: chrono writes the store itself; "
                        f"write the result elsewhere")


def _fmt_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(table, out=None, max_rows: int | None = None, more: str = "") -> None:
    """Print a table as aligned text columns.

    ``table``: a ``pyarrow.Table``, or a ``(column_names, rows)`` pair of plain
    Python values (what DuckDB's ``fetchall`` returns; no pyarrow needed).
    ``more``: how the calling command shows the rows beyond ``max_rows`` (its own options),
    printed after "... N more rows".
    """
    out = out or sys.stdout
    if isinstance(table, tuple):
        cols, rows = list(table[0]), [dict(zip(table[0], r)) for r in table[1]]
    else:
        cols, rows = table.column_names, table.to_pylist()
    if max_rows is not None and len(rows) > max_rows:
        hidden = len(rows) - max_rows
        rows = rows[:max_rows]
    else:
        hidden = 0
    cells = [[_fmt_cell(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    out.write("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")
    if hidden:
        out.write(f"... {hidden} more rows" + (f" ({more})" if more else "") + "\n")
    if not rows:
        out.write("(no rows)\n")
