r"""Safeguard presets and the tangent cap.

The safeguards of the LR update itself -- (a) ``max_lr_change``, (a') ``max_lr_growth``,
(b) ``hypergrad_norm``, (d) ``hyper_lr_rprop``, (e) ``loss_trust``, (f) ``decay_trend`` -- are rules that change eta and beta: their
maths and code live with every other such rule in ``controller.py``. All off is the
faithful algorithm of SPEC section 2; ``Marthe``'s default is the preset "robust".

(c) ``max_tangent_ratio = kappa``: after each update, if
    :math:`\|Z^w\| > \kappa \|w\|` every tangent block is scaled by
    :math:`\kappa \|w\| / \|Z^w\|` (direction kept, runaway magnitude cut). One foreach
    pass and device scalars: no host synchronisation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

HYPERGRAD_NORMS = (None, "rms", "rms-log")
# (f)'s statistic: the running mean of the normalised h, or of its sign (controller.py)
DECAY_TREND_TESTS = ("mean", "sign")

# ``Marthe(safeguards=NAME)`` sets these options unless the caller sets them; None sets none
# (the faithful algorithm, unless options are given one by one). "robust" is the variant
# "robust-2+trend2" of issue 15's study (python/marthe_experiments/default_study.py): the
# safeguard study's "rms-log+growth+rprop", the loss trust region (e) tau = 0.5 and the decay
# trend (f) z = 2 (README, "The default's study"; (d) at (0.75, 1.2) was measured too and is
# not the default: see there).
PRESETS: dict[str, dict] = {
    "robust": {"hypergrad_norm": "rms-log", "max_lr_growth": 1.1, "hyper_lr_rprop": (0.5, 1.2),
               "loss_trust": 0.5, "decay_trend": 2.0},
}
# beta when the caller gives none: an absolute step on h (the faithful algorithm), or a
# step on the RMS-normalised h (with "rms-log" a relative step, the first of (d)'s steps).
DEFAULT_HYPER_LR = {"raw": 1e-6, "normalised": 1e-3}


def cap_tangents_(params: Sequence[Tensor], tangents: Sequence[Tensor],
                  state_tangents: Sequence[Tensor], kappa: float, ok: Tensor) -> None:
    """Scale every tangent by min(1, kappa ||w|| / ||Zw||) (in place, where ok)."""
    if not tangents:
        return
    w_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(params))).double())
    z_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tangents))).double())
    limit = kappa * w_norm
    scale = torch.where(ok & (z_norm > limit), limit / torch.clamp(z_norm, min=1e-300),
                        torch.ones_like(z_norm))
    torch._foreach_mul_(list(tangents) + list(state_tangents), scale)
