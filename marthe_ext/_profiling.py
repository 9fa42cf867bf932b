"""NVTX ranges around the phases of ``Marthe.step`` for Nsight Systems: ``marthe.gradient``,
``marthe.hvp`` (one ``marthe.gradient+hvp`` range for the forward engine, which does both
in one pass), ``marthe.fused_update`` and ``marthe.hypergradient``. No "/" in the names:
ncu's ``--nvtx-include`` reads it as nesting.

Off unless ``MARTHE_NVTX=1`` is set when marthe_ext is imported (or ``enable(True)``
is called): then each phase pushes an NVTX range. When off, ``phase`` returns a shared
null context, so profiling costs nothing in normal runs.
"""
from __future__ import annotations

import contextlib
import os

import torch

_enabled = os.environ.get("MARTHE_NVTX") == "1"
_NULL = contextlib.nullcontext()


def enable(flag: bool = True) -> None:
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def _nvtx_range(name: str):
    torch.cuda.nvtx.range_push(f"marthe.{name}")
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def phase(name: str):
    return _nvtx_range(name) if _enabled else _NULL
