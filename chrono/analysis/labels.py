"""Readable labels for token ids, from what the run's manifest says about its tokenizer.

- ``config.tokenizer``: a path to a local ``tokenizer.json`` (Hugging Face
  ``tokenizers`` format) -> decoded with the ``tokenizers`` library, offline;
- ``config.byte_level: true``, or a reference workload with ``vocab_size`` 256
  (``config.workload.vocab_size``) -> the byte itself: printable ASCII as the
  character, anything else as ``\\xNN`` (space shows as ``·``, newline as ``\\n``);
- otherwise no labels (the id is shown).
"""
from __future__ import annotations

import json
from pathlib import Path


def _config(con, run: str) -> dict:
    rows = con.execute("SELECT config FROM runs WHERE run_id = $run", {"run": run}).fetchall()
    try:
        return (json.loads(rows[0][0]) or {}) if rows and rows[0][0] else {}
    except (TypeError, ValueError):
        return {}


def byte_label(b: int) -> str:
    if b == 32:
        return "·"
    if b == 10:
        return "\\n"
    if b == 9:
        return "\\t"
    if 33 <= b < 127:
        return chr(b)
    return f"\\x{b:02x}"


def token_labeler(con, run: str):
    """A function token_id -> str, or None when the run says nothing about its tokenizer."""
    cfg = _config(con, run)
    tok = cfg.get("tokenizer")
    if isinstance(tok, str) and tok.endswith(".json") and Path(tok).is_file():
        try:
            from tokenizers import Tokenizer

            t = Tokenizer.from_file(tok)
            return lambda i: t.decode([int(i)]) if i is not None else ""
        except Exception:  # a malformed file: no labels rather than a failed page
            return None
    workload = cfg.get("workload") if isinstance(cfg.get("workload"), dict) else {}
    if cfg.get("byte_level") is True or workload.get("vocab_size") == 256:
        return lambda i: byte_label(int(i)) if i is not None and 0 <= int(i) < 256 else str(i)
    return None
