"""Dashboard pages; Streamlit runs each file as a script (see streamlit_app.PAGES)."""
