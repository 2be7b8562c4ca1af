"""SQL: a read-only DuckDB console over the store, with CSV / Parquet download."""
from __future__ import annotations

import io

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import streamlit as st

import chrono
from dashboard import data, ui

st.title("SQL")
st.caption("Read-only DuckDB over the store. Views: `runs routing tokens snapshots alerts decisions "
           "signals lifecycle`. Statements that write (CREATE, INSERT, COPY, ATTACH, SET, ...) are refused.")

run = ui.selected_run()
example = st.selectbox("Examples", list(data.SQL_EXAMPLES), index=None, placeholder="Start from an example…",
                       key="sql_example",
                       help="Examples read the run picked in the sidebar (its id is in the SQL); "
                            "edit or delete the WHERE clause to query all runs.")
# Load an example when it is picked, and again when the sidebar run changes while the text is
# still the untouched example (an edited query is never overwritten).
loaded = st.session_state.get("sql_loaded")  # (example, run, text) last put in the box
if example and (loaded is None or loaded[:2] != (example, run)) and (
        loaded is None or loaded[0] != example or st.session_state.get("sql_text") == loaded[2]):
    text = data.sql_example(example, run)
    st.session_state["sql_text"] = text
    st.session_state["sql_loaded"] = (example, run, text)
    for k in ("sql_error", "sql_result"):  # an old error or result is not about this query
        st.session_state.pop(k, None)
if "sql_text" not in st.session_state:
    st.session_state["sql_text"] = data.sql_example("Tokens per expert", run)
if run:
    st.caption(f"Sidebar run: `{run}`. Queries see every run; the examples filter `WHERE run_id = '{run}'`.")

with st.form("sql_form"):
    sql = st.text_area("Query", key="sql_text", height=140)
    limit = st.number_input("Row limit", min_value=1, max_value=1_000_000, value=data.SQL_ROW_LIMIT,
                            step=1000, key="sql_limit")
    submitted = st.form_submit_button("Run", type="primary")

if submitted:
    try:
        result = data.sql_console(sql, int(limit))
        st.session_state["sql_result"] = (sql, int(limit), result)
        st.session_state.pop("sql_error", None)
    except chrono.QueryError as e:
        st.session_state["sql_error"] = (sql, str(e))
        st.session_state.pop("sql_result", None)

if "sql_error" in st.session_state and st.session_state["sql_error"][0] == sql:
    st.error(f"Query refused or failed: {st.session_state['sql_error'][1]}")
elif "sql_result" in st.session_state and st.session_state["sql_result"][0] == sql:
    ran, lim, result = st.session_state["sql_result"]
    more = " (row limit reached: raise it or aggregate)" if result.num_rows >= lim else ""
    st.markdown(f"**{result.num_rows:,} rows × {result.num_columns} columns**{more}")
    st.dataframe(result.to_pandas(), hide_index=True)
    csv_buf = io.BytesIO()
    pcsv.write_csv(result, csv_buf)
    pq_buf = io.BytesIO()
    pq.write_table(result, pq_buf)
    c = st.columns(2)
    c[0].download_button("Download CSV", csv_buf.getvalue(), file_name="chrono_query.csv", mime="text/csv")
    c[1].download_button("Download Parquet", pq_buf.getvalue(), file_name="chrono_query.parquet",
                         mime="application/vnd.apache.parquet")
