"""``chrono.store.arrow_schema`` (the ``ARROW:schema`` footer value read without pyarrow) against
pyarrow: the expected field types come from pyarrow's own reading of the same value
(``pa.ipc.read_schema``), for chrono's table schemas and for random schemas of odd types."""
from __future__ import annotations

import base64
import io

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chrono.columns import COLUMNS
from chrono.schema import TABLES
from chrono.store.arrow_schema import field_types

# pyarrow type -> the chrono.columns name field_types must give a plain field of that type.
CHRONO_NAMES = {pa.string(): "string", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
                pa.float32(): "float32", pa.float64(): "float64", pa.bool_(): "bool_"}

TYPES = [
    *CHRONO_NAMES,
    pa.int8(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64(), pa.float16(), pa.null(),
    pa.large_string(), pa.string_view(), pa.binary(), pa.large_binary(), pa.binary(4),
    pa.duration("s"), pa.duration("ns"), pa.timestamp("ms"), pa.timestamp("us", "UTC"),
    pa.date32(), pa.date64(), pa.time32("s"), pa.time64("ns"),
    pa.decimal128(20, 2), pa.decimal256(40, 3),
    pa.dictionary(pa.int32(), pa.string()), pa.dictionary(pa.int8(), pa.int64()),
    pa.list_(pa.int32()), pa.large_list(pa.string()), pa.struct([("a", pa.int64())]),
    pa.map_(pa.string(), pa.int32()),
    pa.opaque(pa.int64(), "ticks", "acme"), pa.opaque(pa.string(), "label", "acme"), pa.json_(pa.string()),
    pa.uuid(), pa.bool8(),
]


def footer_value(schema: pa.Schema) -> bytes:
    """The ARROW:schema value pyarrow's Parquet writer stores for ``schema`` (an empty table)."""
    buf = io.BytesIO()
    pq.write_table(schema.empty_table(), buf)
    buf.seek(0)
    return pq.read_metadata(buf).metadata[b"ARROW:schema"]


def expected(value: bytes) -> tuple:
    """(name, chrono type name or None) of each field, from pyarrow's reading of the value."""
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(value)))
    return tuple((f.name, CHRONO_NAMES.get(f.type) if not f.metadata else None) for f in schema)


def test_chronos_table_schemas_read_back_as_their_columns():
    for table, cols in COLUMNS.items():
        schema = TABLES[table].with_metadata({b"chrono.table": table.encode(), b"chrono.schema_version": b"2"})
        value = footer_value(schema)
        assert field_types(value) == tuple((n, t) for n, t, _ in cols) == expected(value), table
        assert field_types(base64.b64encode(schema.serialize().to_pybytes())) == expected(value)


names = st.text(alphabet="abcxyz_ .é0", min_size=1, max_size=8)
fields = st.builds(
    lambda name, t, nullable, meta: pa.field(name, t, nullable or t == pa.null(), {b"k": b"v"} if meta else None),
    names, st.sampled_from(TYPES), st.booleans(), st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fields, min_size=0, max_size=10, unique_by=lambda f: f.name), st.booleans())
def test_random_schemas_read_back_as_pyarrow_reads_them(fs, schema_metadata):
    schema = pa.schema(fs, metadata={b"chrono.table": b"routing"} if schema_metadata else None)
    for value in (footer_value(schema), base64.b64encode(schema.serialize().to_pybytes())):
        assert field_types(value) == expected(value)


@settings(max_examples=150, deadline=None)
@given(st.lists(fields, min_size=1, max_size=6, unique_by=lambda f: f.name), st.data())
def test_cut_or_damaged_values_give_none_or_the_whole_answer(fs, data):
    """A prefix, a flipped byte or junk: never raises; a prefix loses at most trailing padding."""
    raw = base64.b64decode(footer_value(pa.schema(fs)))
    whole = field_types(base64.b64encode(raw))
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert field_types(base64.b64encode(raw[:cut])) in (None, whole)
    pos, byte = data.draw(st.integers(0, len(raw) - 1)), data.draw(st.integers(0, 255))
    damaged = field_types(base64.b64encode(raw[:pos] + bytes([byte]) + raw[pos + 1:]))
    assert damaged is None or isinstance(damaged, tuple)
    junk = field_types(base64.b64encode(data.draw(st.binary(max_size=64))))
    assert junk is None or isinstance(junk, tuple)
    assert field_types(b"not base64!") is None
