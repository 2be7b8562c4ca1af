"""``python -m chrono_cli ...`` is the same as ``chrono ...``."""
import sys

from chrono_cli.main import main

sys.exit(main())
