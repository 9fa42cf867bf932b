"""Experiments reproducing the MARTHE paper's comparisons with ``marthe_ext``.

``python python/run.py demo`` (or ``python -m marthe_experiments demo`` with ``python/`` on
the path) runs the quick digits demo; ``e1`` is the LR-schedule study (LRS-OPT vs the
online methods), ``e2`` the CNN protocol. See ``python/README_SECTION.md``.
"""
from .data import DataError, load_splits, read_idx
from .e1 import E1Config, e1_config, run_e1
from .e2 import E2Config, e2_config, run_e2
from .lrs_opt import Unroll, optimise_schedule

__all__ = ["DataError", "load_splits", "read_idx", "E1Config", "e1_config", "run_e1", "E2Config",
           "e2_config", "run_e2", "Unroll", "optimise_schedule"]
