"""Forged ``ARROW:schema`` values and footers against pyarrow (review 5 of ``chrono.store.footers``).

A small FlatBuffers writer below lays out Schema messages byte by byte, so each test can break one
rule pyarrow's reader enforces (the FlatBuffers verifier: alignment, NUL-terminated strings, vectors
in the buffer; Arrow: known integer widths, a type for every field) while the fields keep chrono's
names and types. Ground truth is pyarrow: ``pa.ipc.read_schema`` for a value, ``catalog.part_info``
for a part (a DuckDB-written routing part carrying chrono's label and the forged value).
"""
from __future__ import annotations

import base64
import json
import struct

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chrono.columns import COLUMNS
from chrono.schema import TABLES
from chrono.store import catalog
from chrono.store.arrow_schema import field_types
from chrono.store.footers import part_infos

ROUTING = [(n, t) for n, t, _ in COLUMNS["routing"]]
TAGS = {"int": 2, "float": 3, "utf8": 5, "bool": 6}


class _Writer:
    """Objects laid out front to back (every offset points forward); ``fix`` patches offsets."""

    def __init__(self):
        self.buf, self.fix, self.at = bytearray(4), [], {}

    def pad(self, n: int, skew: int = 0) -> None:
        self.buf += b"\0" * ((-len(self.buf)) % n) + b"\0" * skew

    def string(self, key, s: bytes, nul=True, skew=0):
        self.pad(4, skew)
        self.at[key] = len(self.buf)
        self.buf += struct.pack("<I", len(s)) + s + (b"\0" if nul else b"")

    def vector(self, key, refs, length=None):
        self.pad(4)
        self.at[key] = len(self.buf)
        self.buf += struct.pack("<I", len(refs) if length is None else length)
        for r in refs:
            self.fix.append((len(self.buf), r))
            self.buf += bytes(4)

    def table(self, key, slots, skew=0, vtable_skew=0):
        """slots by field id: None (absent), (struct format, value) or ("ref", key)."""
        body, offs, refs = bytearray(4), [], []
        for s in slots:
            if s is None:
                offs.append(0)
                continue
            size = 4 if s[0] == "ref" else struct.calcsize(s[0])
            body += b"\0" * ((-len(body)) % size)
            offs.append(len(body))
            if s[0] == "ref":
                refs.append((len(body), s[1]))
                body += bytes(4)
            else:
                body += struct.pack(s[0], s[1])
        body += b"\0" * ((-len(body)) % 4)
        self.pad(2, vtable_skew)
        vt = len(self.buf)
        self.buf += struct.pack(f"<HH{len(offs)}H", 4 + 2 * len(offs), len(body), *offs)
        self.pad(8 if any(s and s[0] == "<q" for s in slots) else 4, skew)
        t = self.at[key] = len(self.buf)
        body[0:4] = struct.pack("<i", t - vt)
        self.fix += [(t + off, r) for off, r in refs]
        self.buf += body

    def finish(self, root) -> bytes:
        for at, key in self.fix:
            struct.pack_into("<I", self.buf, at, self.at[key] - at)
        struct.pack_into("<I", self.buf, 0, self.at[root])
        self.pad(8)
        return bytes(self.buf)


def _type(t: str):
    """(union tag, type table slots) of a chrono type or of a forged one."""
    if t in ("string", "bool_"):
        return TAGS["utf8" if t == "string" else "bool"], []
    if t.startswith("int"):
        return TAGS["int"], [("<i", int(t[3:])), ("<B", 1)]
    if t == "tag99":
        return 99, []
    return TAGS["float"], [("<h", {"float32": 1, "float64": 2}[t])]


def forge(cols, *, version=4, body_length=0, message_metadata=False, schema_metadata=None, features=False,
          nul=True, string_skew=0, table_skew=0, vtable_skew=0, legacy=False) -> bytes:
    """Base64 ARROW:schema value of a Schema message; the keywords break one rule each (the first
    field's name, table or vtable for ``nul``/``*_skew``). ``cols``: [(name, type)]; type may also be
    "int12" (a width Arrow does not know), "tag99" (no such type), "notype" or "badchildren"."""
    w = _Writer()
    msg = [("<h", version), ("<B", 1), ("ref", "schema")]
    if body_length or message_metadata:
        msg.append(("<q", body_length))
    if message_metadata:
        msg.append(("ref", "msg_md"))
    w.table("message", msg)
    sch = [("<h", 0), ("ref", "fields"), ("ref", "sch_md") if schema_metadata is not None else None]
    w.table("schema", sch + ([("ref", "features")] if features else []))
    w.vector("fields", [f"f{i}" for i in range(len(cols))])
    for i, (name, t) in enumerate(cols):
        tag, tslots = _type("int32" if t in ("notype", "badchildren") else t)
        w.table(f"f{i}", [("ref", f"n{i}"), ("<B", 1), ("<B", tag), None if t == "notype" else ("ref", f"t{i}"),
                          None, ("ref", f"c{i}")], skew=table_skew * (i == 0), vtable_skew=vtable_skew * (i == 0))
        w.string(f"n{i}", name.encode() if isinstance(name, str) else name, nul=nul or i > 0,
                 skew=string_skew * (i == 0))
        w.table(f"t{i}", tslots)
        w.vector(f"c{i}", [], length=1000 if t == "badchildren" else None)
    if message_metadata:
        w.vector("msg_md", [], length=1000)
    if schema_metadata is not None:
        if schema_metadata == "broken":
            w.vector("sch_md", [], length=1000)
        else:
            w.vector("sch_md", [f"kv{j}" for j in range(len(schema_metadata))])
            for j, (k, v) in enumerate(schema_metadata):
                w.table(f"kv{j}", [None if k is None else ("ref", f"k{j}"), None if v is None else ("ref", f"v{j}")])
                for key, s in ((f"k{j}", k), (f"v{j}", v)):
                    if s is not None:
                        w.string(key, s)
    if features:
        w.vector("features", [], length=1000)
    fb = w.finish("message")
    head = struct.pack("<i", len(fb)) if legacy else b"\xff\xff\xff\xff" + struct.pack("<i", len(fb))
    return base64.b64encode(head + fb + bytes(body_length))


def _pyarrow_reads(value: bytes) -> bool:
    try:
        pa.ipc.read_schema(pa.py_buffer(base64.b64decode(value)))
        return True
    except (OSError, pa.ArrowException):
        return False


def test_the_writer_forges_what_pyarrow_reads():
    for kw in ({}, {"version": 3}, {"legacy": True}, {"schema_metadata": [(b"chrono.table", b"routing")]}):
        value = forge(ROUTING, **kw)
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(value)))
        assert [(f.name, f.type) for f in schema] == [(f.name, f.type) for f in TABLES["routing"]]
        assert field_types(value) == tuple(ROUTING)


# Values whose every field keeps chrono's name and type but pyarrow refuses (on main, field_types
# read all of them as the routing table's columns, and part_infos vouched for such parts).
REFUSED = {
    "name_not_nul_terminated": {"nul": False},
    "string_misaligned": {"string_skew": 1},
    "table_misaligned": {"table_skew": 2},
    "vtable_misaligned": {"vtable_skew": 1},
    "schema_metadata_past_the_end": {"schema_metadata": "broken"},
    "schema_metadata_without_value": {"schema_metadata": [(b"chrono.table", None)]},
    "schema_metadata_without_key": {"schema_metadata": [(None, b"routing")]},
    "message_metadata_past_the_end": {"message_metadata": True},
    "features_past_the_end": {"features": True},
}


@pytest.mark.parametrize("kind", REFUSED)
def test_values_pyarrow_refuses_give_none(kind):
    value = forge(ROUTING, **REFUSED[kind])
    assert not _pyarrow_reads(value)
    assert field_types(value) is None


# An extra column (of no table) whose Arrow field pyarrow refuses, next to chrono's own fields.
EXTRA_REFUSED = ("int12", "tag99", "notype", "badchildren")


@pytest.mark.parametrize("extra", EXTRA_REFUSED)
def test_an_extra_field_pyarrow_refuses_is_not_typed(extra):
    value = forge(ROUTING + [("extra", extra)])
    assert not _pyarrow_reads(value)
    fields = field_types(value)
    assert fields is None or fields[-1] == ("extra", None)


def test_field_types_never_raises_on_other_objects():
    value = forge(ROUTING)
    assert field_types(bytearray(value)) == field_types(memoryview(value)) == tuple(ROUTING)
    for other in ([1], {}, {"a": 1}, set(), None, 5, 1.5, "é", object()):
        assert field_types(other) is None


def _part(tmp_path, name: str, metadata: dict, extra: bool = False) -> str:
    """A DuckDB-written routing part (one row) with this footer metadata; ``extra``: an int32 column more."""
    src = tmp_path / "src.parquet"
    if not src.exists():
        row = {"run_id": ["a"], "step": [1], "mode": ["TRAIN"], "layer": [0], "expert": [1], "tokens": [3],
               "weight_sum": [None], "dropped": [0], "rank": [0]}
        pq.write_table(pa.table(row, schema=TABLES["routing"]), src, store_schema=False)
    path = tmp_path / f"{name}.parquet"
    kv = ", ".join(f"'{k}': '{v}'" for k, v in metadata.items())
    duckdb.execute(f"COPY (SELECT *{', 7::INTEGER AS extra' if extra else ''} FROM read_parquet('{src}')) "
                   f"TO '{path}' (FORMAT parquet, KV_METADATA {{{kv}}})")
    return str(path)


def _verdicts(path: str) -> tuple:
    catalog._read_part_info.cache_clear()
    return part_infos(duckdb.connect(), [(path, "routing")])[path], catalog.part_info(path, "routing")


@pytest.mark.parametrize("kind", [*REFUSED, *EXTRA_REFUSED, "plain", "extra_int32"])
def test_parts_with_forged_arrow_schemas_get_pyarrows_verdict(tmp_path, kind):
    extra = kind in EXTRA_REFUSED or kind == "extra_int32"
    cols = ROUTING + [("extra", "int32" if kind == "extra_int32" else kind)] if extra else ROUTING
    value = forge(cols, **REFUSED.get(kind, {}))
    path = _part(tmp_path, kind, {"chrono.table": "routing", "ARROW:schema": value.decode()}, extra)
    fast, slow = _verdicts(path)
    assert fast == slow
    assert slow.readable == (kind in ("plain", "extra_int32"))


def test_deeply_nested_replaces_metadata_is_unreadable_not_a_crash(tmp_path):
    """json.loads raises RecursionError (not ValueError) on deep nesting: part_info caught it, the
    fast path let it out of part_infos (a traceback for `chrono runs`)."""
    deep = "[" * 100_000 + "]" * 100_000
    path = _part(tmp_path, "deep", {"chrono.table": "routing", "chrono.replaces": deep})
    with pytest.raises(RecursionError):
        json.loads(deep)
    fast, slow = _verdicts(path)
    assert fast == slow and not slow.readable


CHRONO_NAMES = {pa.string(): "string", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
                pa.float32(): "float32", pa.float64(): "float64", pa.bool_(): "bool_"}
SEEDS = [base64.b64decode(forge(ROUTING)), base64.b64decode(forge(ROUTING, schema_metadata=[(b"k", b"v")])),
         *(TABLES[t].with_metadata({b"chrono.table": t.encode()}).serialize().to_pybytes() for t in TABLES)]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                        min_size=1, max_size=3))
def test_a_mutated_value_read_as_all_plain_fields_is_read_so_by_pyarrow(seed, edits):
    """What footers vouches on (every field typed) implies pyarrow reads the value, with those types.
    (Fuzzing 170k such mutations found the KeyValue without key or value; none since.)"""
    raw = bytearray(seed)
    for where, byte in edits:
        raw[int(where * len(raw))] = byte
    fields = field_types(base64.b64encode(bytes(raw)))
    if fields is None or any(t is None for _, t in fields):
        return
    schema = pa.ipc.read_schema(pa.py_buffer(bytes(raw)))
    assert tuple((f.name, None if f.metadata else CHRONO_NAMES.get(f.type)) for f in schema) == fields
