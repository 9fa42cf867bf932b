"""The pure-torch reference backend: SPEC section 2 step 4, written to be read.

Vectorised over the parameter list with ``torch._foreach_*`` ops (no flattening copies,
no per-element Python, no host synchronisation). New values are computed out of place
and committed with ``torch.where(ok, new, old)``, so a skipped (non-finite) step leaves
every buffer bit-identical without the host having to look at the flag. Every fast
backend is tested against this file, and this file against the float64 oracles.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .api import (
    COEFF_BC1, COEFF_BC2, COEFF_ETA, COEFF_MU, COEFF_OK, COEFF_SCALE,
    GroupBuffers, GroupOptions,
)



def _axpy(x: list[Tensor], a, y: list[Tensor]) -> list[Tensor]:
    """x + a * y, a a number or a 0-dim tensor."""
    return torch._foreach_add(x, torch._foreach_mul(y, a))


def _clip(xs: list[Tensor], c: float) -> list[Tensor]:
    return torch._foreach_clamp_min(torch._foreach_clamp_max(xs, c), -c)


def _commit(olds: Sequence[Tensor], news: Sequence[Tensor], ok: Tensor) -> None:
    for old, new in zip(olds, news):
        old.copy_(torch.where(ok, new.to(old.dtype), old))


class TorchBackend:
    name = "torch"

    def fused_update_(self, opts: GroupOptions, bufs: GroupBuffers, coeffs: Tensor) -> None:
        if not bufs.params:
            return
        cdt = bufs.tangents[0].dtype  # compute dtype = the tangents' (float32 for bf16 params)
        c = coeffs.to(cdt)
        eta, mu, s = c[COEFF_ETA], c[COEFF_MU], c[COEFF_SCALE]
        ok = coeffs[COEFF_OK] != 0

        w = [p.to(cdt) for p in bufs.params]
        g = [x.to(cdt) for x in bufs.grads]
        zw = bufs.tangents
        hz = None if bufs.hvps is None else [x.to(cdt) for x in bufs.hvps]

        wd = opts.coupled_weight_decay
        if wd:
            g = _axpy(g, wd, w)
            if hz is not None:
                hz = _axpy(hz, wd, zw)
        if opts.grad_clip is not None:
            clip = float(opts.grad_clip)
            if hz is not None:
                hz = _clip([torch.where(gi.abs() <= clip, hi, 0) for gi, hi in zip(g, hz)], clip)
            g = _clip(g, clip)
        # From here g is the clipped gradient gc, hz the masked and clipped H Zw (or None = 0).

        d = opts.dynamics
        if d == "sgd":
            w_new = _axpy(w, -eta, g)
            inner = zw if hz is None else _axpy(zw, -eta, hz)  # Zw - eta hz
            zw_new = _axpy(torch._foreach_mul(inner, mu), -s, g)
            _commit(bufs.params, w_new, ok)
            _commit(zw, zw_new, ok)
        elif d == "sgdm":
            (v,), (zv,) = bufs.state, bufs.state_tangents
            m = opts.momentum
            v_new = _axpy(g, m, v)                       # v' = m v + gc
            mzv_hz = torch._foreach_mul(zv, m) if hz is None else _axpy(hz, m, zv)  # m Zv + hz
            zv_new = torch._foreach_mul(mzv_hz, mu)
            if opts.nesterov:
                step_dir = _axpy(g, m, v_new)            # d = gc + m v'
                d_tan = torch._foreach_mul(mzv_hz, m)      # hz + m (m Zv + hz)
                if hz is not None:
                    d_tan = torch._foreach_add(d_tan, hz)
                zw_new = _axpy(torch._foreach_mul(_axpy(zw, -eta, d_tan), mu), -s, step_dir)
            else:
                step_dir = v_new
                zw_new = _axpy(_axpy(torch._foreach_mul(zw, mu), -eta, zv_new), -s, v_new)
            w_new = _axpy(w, -eta, step_dir)
            _commit(bufs.params, w_new, ok)
            _commit(v, v_new, ok)
            _commit(zw, zw_new, ok)
            _commit(zv, zv_new, ok)
        elif d in ("adam", "adamw"):
            (m, v), (zm, zv) = bufs.state, bufs.state_tangents
            b1, b2, eps = opts.beta1, opts.beta2, opts.eps
            bc1, sbc2 = c[COEFF_BC1], torch.sqrt(c[COEFF_BC2])
            m_new = _axpy(torch._foreach_mul(m, b1), 1 - b1, g)
            v_new = _axpy(torch._foreach_mul(v, b2), 1 - b2, torch._foreach_mul(g, g))
            sqrt_v = torch._foreach_sqrt(v_new)
            den = torch._foreach_add(torch._foreach_div(sqrt_v, sbc2), eps)
            m_hat = torch._foreach_div(m_new, bc1)
            u = torch._foreach_div(m_hat, den)
            # Tangents of m', v' (before the mu discount), then of u.
            dm = torch._foreach_mul(zm, b1)
            dv = torch._foreach_mul(zv, b2)
            if hz is not None:
                dm = _axpy(dm, 1 - b1, hz)
                dv = _axpy(dv, 2 * (1 - b2), torch._foreach_mul(g, hz))
            du_m = torch._foreach_div(dm, torch._foreach_mul(den, bc1))
            # d sqrt(v')/sqrt(bc2) = dv / (2 sqrt(bc2) sqrt(v')), taken as 0 where v' = 0.
            dsq = [torch.where(sv > 0, dvi / (2 * sbc2 * sv), 0) for sv, dvi in zip(sqrt_v, dv)]
            du = torch._foreach_sub(du_m, torch._foreach_mul(
                torch._foreach_div(m_hat, torch._foreach_mul(den, den)), dsq))
            if d == "adam":
                w_new = _axpy(w, -eta, u)
                zw_new = _axpy(torch._foreach_mul(_axpy(zw, -eta, du), mu), -s, u)
            else:
                decay = 1 - eta * opts.weight_decay
                w_new = _axpy(torch._foreach_mul(w, decay), -eta, u)
                b_term = _axpy(u, opts.weight_decay, w)          # wd w + u
                inner = _axpy(torch._foreach_mul(zw, decay), -eta, du)
                zw_new = _axpy(torch._foreach_mul(inner, mu), -s, b_term)
            _commit(bufs.params, w_new, ok)
            _commit(m, m_new, ok)
            _commit(v, v_new, ok)
            _commit(zw, zw_new, ok)
            _commit(zm, torch._foreach_mul(dm, mu), ok)
            _commit(zv, torch._foreach_mul(dv, mu), ok)
        else:
            raise ValueError(f"unknown dynamics {d!r}")

    def clipped_dot(
        self,
        a: Sequence[Tensor],
        b: Sequence[Tensor],
        *,
        clip: Optional[float] = None,
        a_extra: Optional[Sequence[Tensor]] = None,
        a_extra_scale: float = 0.0,
        clip_b: bool = False,
    ) -> Tensor:
        if not a:
            return torch.zeros((), dtype=torch.float64)
        acc = torch.float64 if a[0].dtype == torch.float64 else torch.float32
        xs = [x.to(acc) for x in a]
        ys = [y.to(acc) for y in b]
        if a_extra is not None and a_extra_scale:
            xs = _axpy(xs, a_extra_scale, [e.to(acc) for e in a_extra])
        if clip is not None:
            xs = _clip(xs, float(clip))
            if clip_b:
                ys = _clip(ys, float(clip))
        prods = torch._foreach_mul(xs, ys)
        return torch.stack([p.sum() for p in prods]).sum()

    def all_finite(self, lists: Sequence[Sequence[Tensor]]) -> Tensor:
        tensors = [t for lst in lists for t in lst if t.numel()]
        if not tensors:
            return torch.ones((), dtype=torch.bool)
        maxabs = torch._foreach_norm(tensors, ord=float("inf"))
        return torch.isfinite(torch.stack([x.to(torch.float64) for x in maxabs])).all()
