"""The chrono dashboard (Streamlit + Altair); reads the store only, never imports torch.

``dashboard.serve(root, port=8501, host="127.0.0.1") -> subprocess.Popen`` starts it.
"""
from __future__ import annotations

from .server import DEFAULT_HOST, DEFAULT_PORT, ServeError, serve, stop, url

__all__ = ["serve", "stop", "url", "ServeError", "DEFAULT_HOST", "DEFAULT_PORT"]
