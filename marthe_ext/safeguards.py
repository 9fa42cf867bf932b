r"""Safeguards against a runaway learning rate (all off = the faithful algorithm of SPEC §2;
``Marthe``'s default is the preset "robust" = (b) "rms-log" + (a') 1.1 + (d) (0.5, 1.2)).

The tangent maths is untouched; these only shape how the hypergradient moves eta, and
bound the tangent's size. Everything is device-scalar arithmetic or one foreach pass:
no host synchronisation, the same for every backend.

(a) ``max_lr_change = rho > 1``: the LR moves by at most a factor rho per step,

    .. math:: \eta_{t+1} \in [\eta_t / \rho,\ \rho\, \eta_t].

(a') ``max_lr_growth = rho_up > 1``: an asymmetric bound, growth only,
    :math:`\eta_{t+1} \le \rho_{up}\, \eta_t`; decreases stay free, so a runaway is
    braked as hard as the hypergradient says.

(b) ``hypergrad_norm``: divide the hypergradient by a running RMS (bias-corrected, decay
    ``d``), so beta no longer depends on the scale of h (Adam-style meta-updates):

    .. math:: v \leftarrow d v + (1-d) x^2, \quad \hat x = x / \sqrt{v / (1 - d^n)}

    "rms": :math:`x = h` and :math:`\eta \leftarrow \max(\eta - \beta \hat x, 0)`
    (beta is an absolute LR step). "rms-log": descend in log-space,
    :math:`x = \eta h = \partial E / \partial \log\eta` and
    :math:`\eta \leftarrow \eta\, e^{-\beta \hat x}`: beta is a relative step, eta stays
    positive without a clamp, and :math:`|\log(\eta_{t+1}/\eta_t)| \le \beta/\sqrt{1-d}`.

(d) ``hyper_lr_rprop = (shrink, grow)`` with a scale-free hypergradient (b): beta itself
    adapts multiplicatively, as delta-bar-delta (Jacobs, 1988) and Rprop adapt a step size
    from gradient signs, here one level up. With :math:`\bar h` an exponential average of
    past hypergradients (decay ``TREND_DECAY`` = 0.9),

    .. math:: \beta_t = \mathrm{clip}\big(\beta_{t-1} \cdot
              \{\text{grow if } h_t \bar h_{t-1} > 0;\ \text{shrink if } h_t \bar h_{t-1} < 0;
              \ 1 \text{ otherwise}\},\ \beta_{min}, \beta_{max}\big),
              \qquad \bar h_t = 0.9\, \bar h_{t-1} + 0.1\, h_t,

    and this step's LR update uses :math:`\beta_t`. A hypergradient that agrees with its
    recent trend (eta is far from where E wants it) lengthens the meta step geometrically;
    one against the trend (eta overshot, or noise dominates) shortens it. The user's beta
    is then only the first meta step: a small one catches up within tens of steps, a large
    one is cut at the first overshoot -- what makes the result insensitive to beta.
    Comparing with the trend rather than with the previous h alone ignores the period-2
    sign flips that a tangent shows at a large LR (eigenvalues of I - eta H below 0),
    which would otherwise freeze beta at its floor (measured: see the README's study).

(c) ``max_tangent_ratio = kappa``: after each update, if
    :math:`\|Z^w\| > \kappa \|w\|` every tangent block is scaled by
    :math:`\kappa \|w\| / \|Z^w\|` (direction kept, runaway magnitude cut).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

HYPERGRAD_NORMS = (None, "rms", "rms-log")

# ``Marthe(safeguards=NAME)`` sets these options unless the caller sets them; None sets none
# (the faithful algorithm, unless options are given one by one). "robust" is the variant
# "rms-log+growth+rprop" of the safeguard study (python/marthe_experiments/safeguard_study.py).
PRESETS: dict[str, dict] = {
    "robust": {"hypergrad_norm": "rms-log", "max_lr_growth": 1.1, "hyper_lr_rprop": (0.5, 1.2)},
}
# beta when the caller gives none: an absolute step on h (the faithful algorithm), or a
# step on the RMS-normalised h (with "rms-log" a relative step, the first of (d)'s steps).
DEFAULT_HYPER_LR = {"raw": 1e-6, "normalised": 1e-3}


def normalized(x: Tensor, sq_avg: Tensor, count: Tensor, decay: float, ok: Tensor) -> Tensor:
    """Update the running mean of x^2 (in place, where ok) and return x / RMS (0 when RMS = 0)."""
    new_sq = decay * sq_avg + (1 - decay) * x * x
    new_count = count + 1
    sq_avg.copy_(torch.where(ok, new_sq, sq_avg))
    count.copy_(torch.where(ok, new_count, count))
    v_hat = new_sq / (1 - decay ** new_count)
    safe = torch.where(v_hat > 0, v_hat, torch.ones_like(v_hat))
    return torch.where(v_hat > 0, x / torch.sqrt(safe), torch.zeros_like(x))


def next_lr(eta: Tensor, beta: Tensor, h: Tensor, *, norm: Optional[str], sq_avg: Tensor,
            count: Tensor, decay: float, rho: Optional[float], ok: Tensor,
            rho_up: Optional[float] = None) -> Tensor:
    """The LR after one hypergradient step, with the chosen safeguards."""
    if norm == "rms-log":
        x = normalized(eta * h, sq_avg, count, decay, ok)
        eta_new = eta * torch.exp(-beta * x)
    elif norm == "rms":
        eta_new = torch.clamp(eta - beta * normalized(h, sq_avg, count, decay, ok), min=0.0)
    else:
        eta_new = torch.clamp(eta - beta * h, min=0.0)
    if rho is not None:
        eta_new = torch.minimum(torch.maximum(eta_new, eta / rho), eta * rho)
    if rho_up is not None:
        eta_new = torch.minimum(eta_new, eta * rho_up)
    return eta_new


TREND_DECAY = 0.9  # (d): the hypergradient trend averages about the last 10 steps


def adapted_hyper_lr(beta: Tensor, h: Tensor, trend: Tensor, *, shrink: float, grow: float,
                     low: float, high: float, ok: Tensor) -> Tensor:
    """Safeguard (d): beta scaled by grow / shrink when h agrees / disagrees in sign with the
    trend (1 when either is 0 or non-finite), clipped to [low, high]; the trend (an
    exponential average of h) is updated in place where ok."""
    agree = h * trend
    trend.copy_(torch.where(ok, TREND_DECAY * trend + (1 - TREND_DECAY) * h, trend))
    factor = torch.where(agree > 0, torch.full_like(beta, grow),
                         torch.where(agree < 0, torch.full_like(beta, shrink), torch.ones_like(beta)))
    # beta = 0 (the caller switched the LR update off) stays 0.
    return torch.where(beta > 0, torch.clamp(beta * factor, min=low, max=high), beta)


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
