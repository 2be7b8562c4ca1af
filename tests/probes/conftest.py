"""Make the probes test helpers (probe_models.py) importable under --import-mode=importlib."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
