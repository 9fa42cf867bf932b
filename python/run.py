"""Entry point: ``python python/run.py {demo,e1,e2} [--quick] [options]``.

Works from a source checkout without installing anything: it puts ``python/`` (this
package) and, when ``marthe_ext`` is not installed, the repository root on the path.
"""
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if importlib.util.find_spec("marthe_ext") is None:
    sys.path.insert(1, str(HERE.parent))

from marthe_experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
