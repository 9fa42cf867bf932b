"""Benchmarks, the pure-autograd baseline and the GPU check of marthe_ext (not part of the
library; see README_SECTION.md)."""
import sys
from pathlib import Path

# The networks live in python/marthe_experiments/models.py (one definition shared with the
# experiments); python/ is not an installed package, so make it importable here, before any
# benchmarks module imports it.
_PYTHON_DIR = str(Path(__file__).resolve().parent.parent / "python")
if _PYTHON_DIR not in sys.path:
    sys.path.append(_PYTHON_DIR)
