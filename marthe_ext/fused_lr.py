"""The LR update as one compiled function (``Marthe(compile_lr_update=True)``).

The default safeguarded LR update (``controller.lr_update_``) is about 57 small tensor
operations per step, each its own kernel launch on a GPU. ``torch.compile`` of that same
function (fullgraph, static shapes) fuses it into one generated kernel (C++ on the CPU,
Triton on CUDA): the maths is written once, in ``controller.py``; here it is only compiled.

No host sync: the compiled function reads and writes device scalars; its guards look at
shapes, dtypes and devices, never at values. The first call compiles (seconds), so it is
opt-in; after that one call per step.

Why the ``(1,)`` views: torch 2.13's compiled code silently drops in-place writes to 0-dim
CPU tensor inputs (``a.copy_(...)`` and ``a.add_(...)`` leave ``a`` unchanged, no error;
measured 2026-12-01); writes to a ``(1,)``-shaped view of the same storage land.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .config import MartheConfig
from .controller import LR_UPDATE_KEYS, lr_update_


def compiled_lr_update(config: MartheConfig) -> Callable[[dict, Tensor, Tensor, Tensor], None]:
    """``update(scalars, h, ok, loss)``: ``lr_update_(config, scalars, h, ok, loss)``, compiled."""

    def body(s: dict, h: Tensor, ok: Tensor, loss: Tensor) -> None:
        lr_update_(config, s, h, ok, loss)

    compiled = torch.compile(body, fullgraph=True, dynamic=False)

    def update(scalars: dict[str, Tensor], h: Tensor, ok: Tensor, loss: Tensor) -> None:
        compiled({k: scalars[k].view(1) for k in LR_UPDATE_KEYS},
                 h.to(scalars["eta"].dtype).reshape(1), ok.reshape(1), loss.reshape(1))

    return update
