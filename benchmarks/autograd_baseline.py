"""The pure-autograd path: MARTHE computed the way the authors' prototype computes it.

This is the baseline ``marthe_ext`` has to beat, written the straightforward way
(it is our own code, modelled on the structure of awslabs/adatune's ``mu_sgd``):

1. ``grads = autograd.grad(loss, params, create_graph=True)``, flattened with ``torch.cat``
   (the coupled L2 term added to the flat gradient inside the graph);
2. the HVP by double backward of the flattened gradient: ``autograd.grad(g @ z_w, params)``,
   flattened again;
3. clipping, the hypergradient and the tangent update as separate torch ops on the flat
   vectors; the optimizer state read back flattened with ``torch.cat``;
4. the step itself by a plain ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` whose
   ``param_groups[...]["lr"]`` is overwritten with the new LR every step;
5. a full validation gradient, flattened, and ``h = (g_val @ z_w).item()``: the
   hypergradient and the new LR are host floats, so every step waits for the device.

The maths are SPEC section 2 exactly (the current eta in the tangent, eta clamped at 0,
elementwise clipping of g, of the HVP and of the validation gradient), so the LR
trajectory equals ``marthe_ext.Marthe``'s (tests/test_autograd_baseline.py): the two do
the same work and only the way of computing it differs. One parameter group, a fixed mu,
no skipping of non-finite steps: what the prototype does.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

DYNAMICS = ("sgd", "sgdm", "adam", "adamw")


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class AutogradMarthe:
    """MARTHE by plain autograd and flat vectors (the prototype's way), for comparison."""

    def __init__(self, params, lr: float = 0.01, dynamics: str = "sgd", momentum: float = 0.9,
                 nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, mu: float = 0.99,
                 hyper_lr: float = 1e-6, grad_clip: Optional[float] = None):
        if dynamics not in DYNAMICS:
            raise ValueError(f"dynamics must be one of {DYNAMICS}, got {dynamics!r}")
        self.params = [p for p in params if p.requires_grad]
        self.dynamics = dynamics
        self.momentum = momentum
        self.nesterov = nesterov
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.mu = float(mu)
        self.hyper_lr = float(hyper_lr)
        self.grad_clip = grad_clip
        self.lr = float(lr)
        self.last_hypergrad = 0.0
        self._numels = [p.numel() for p in self.params]

        if dynamics == "sgd":
            self.inner = torch.optim.SGD(self.params, lr=lr)
        elif dynamics == "sgdm":
            self.inner = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=nesterov)
        elif dynamics == "adam":
            self.inner = torch.optim.Adam(self.params, lr=lr, betas=betas, eps=eps)
        else:
            self.inner = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)

        p0 = self.params[0]
        zeros = lambda: torch.zeros(sum(self._numels), dtype=p0.dtype, device=p0.device)  # noqa: E731
        self.z_w = zeros()
        self.z_m = zeros() if dynamics in ("adam", "adamw") else None
        self.z_v = zeros() if dynamics != "sgd" else None

    @property
    def coupled_weight_decay(self) -> float:
        return 0.0 if self.dynamics == "adamw" else self.weight_decay

    def _clip(self, x: Tensor) -> Tensor:
        c = self.grad_clip
        return x if c is None else torch.clamp(x, -c, c)

    def _lr_update(self, h: float) -> None:
        self.last_hypergrad = h
        self.lr = max(self.lr - self.hyper_lr * h, 0.0)

    def step(self, closure: Callable[[], Tensor],
             val_closure: Optional[Callable[[], Tensor]] = None) -> Tensor:
        """One step; same protocol as ``Marthe.step`` (the closures do not call backward)."""
        loss = closure()
        grads = torch.autograd.grad(loss, self.params, create_graph=True, materialize_grads=True)
        g = flat(grads)
        wd = self.coupled_weight_decay
        if wd:
            g = g + wd * flat(self.params)  # inside the graph: the HVP gets + wd * z_w too
        if g.requires_grad:
            hz = flat(torch.autograd.grad(g @ self.z_w, self.params, materialize_grads=True))
        else:  # a gradient that does not depend on the weights: the Hessian is zero
            hz = torch.zeros_like(g)
        g = g.detach()
        if val_closure is None:
            self._lr_update((self._clip(g) @ self.z_w).item())
        self.update(g, hz)
        if val_closure is not None:
            g_val = flat(torch.autograd.grad(val_closure(), self.params, materialize_grads=True))
            self._lr_update((self._clip(g_val) @ self.z_w).item())
        return loss.detach()

    def update_from_lists(self, grads: Sequence[Tensor], hvps: Sequence[Tensor]) -> None:
        """The elementwise part from per-parameter lists, as the prototype receives them."""
        self.update(flat(grads), flat(hvps))

    def update(self, g: Tensor, hz: Tensor) -> None:
        """The elementwise part of a step: clip, torch optimizer step, tangent update.

        ``g`` is the flat gradient (with the coupled L2 term), ``hz`` the flat ``H z_w``.
        """
        c = self.grad_clip
        if c is not None:
            hz = torch.clamp(hz * (g.abs() <= c), -c, c)
            g = torch.clamp(g, -c, c)
        eta, mu = self.lr, self.mu
        w_old = flat(self.params).detach() if self.dynamics == "adamw" else None
        for p, gi in zip(self.params, g.split(self._numels)):
            p.grad = gi.view_as(p)
        for group in self.inner.param_groups:
            group["lr"] = eta
        self.inner.step()
        state = [self.inner.state[p] for p in self.params]

        if self.dynamics == "sgd":
            self.z_w = mu * (self.z_w - eta * hz) - g
        elif self.dynamics == "sgdm":
            v = flat([s["momentum_buffer"] for s in state])
            m = self.momentum
            mzv_hz = m * self.z_v + hz
            if self.nesterov:
                self.z_w = mu * (self.z_w - eta * (hz + m * mzv_hz)) - (g + m * v)
                self.z_v = mu * mzv_hz
            else:
                self.z_v = mu * mzv_hz
                self.z_w = mu * self.z_w - eta * self.z_v - v
        else:
            b1, b2 = self.betas
            m_new = flat([s["exp_avg"] for s in state])
            v_new = flat([s["exp_avg_sq"] for s in state])
            k = float(state[0]["step"])
            bc1 = 1 - b1 ** k
            sbc2 = math.sqrt(1 - b2 ** k)
            sqrt_v = v_new.sqrt()
            den = sqrt_v / sbc2 + self.eps
            m_hat = m_new / bc1
            u = m_hat / den
            dm = b1 * self.z_m + (1 - b1) * hz
            dv = b2 * self.z_v + 2 * (1 - b2) * g * hz
            dsq = torch.where(sqrt_v > 0, dv / (2 * sbc2 * sqrt_v), torch.zeros_like(dv))
            du = dm / (bc1 * den) - m_hat / (den * den) * dsq
            if self.dynamics == "adam":
                self.z_w = mu * (self.z_w - eta * du) - u
            else:
                decay = 1 - eta * self.weight_decay
                self.z_w = mu * (decay * self.z_w - eta * du) - (self.weight_decay * w_old + u)
            self.z_m = mu * dm
            self.z_v = mu * dv
