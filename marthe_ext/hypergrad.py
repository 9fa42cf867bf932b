"""The validation hypergradient ``h = <grad E(w), Zw>`` (SPEC section 2, step 5).

* "grad": the full validation gradient, clipped elementwise like g, then a dot product
  (the authors' path; also gives ``grad E`` to the automatic-mu rule).
* "jvp": the forward-mode directional derivative of E along Zw with dual parameters:
  one forward pass, no backward, no gradient in memory. Exact, but unclipped: it equals
  "grad" whenever no component of grad E exceeds the clip. Needs ``Marthe(model=...)``.
* "fd": the central difference ``(E(w + r Zw) - E(w - r Zw)) / 2r`` under no_grad,
  two forward passes, TF32 off during them; approximate: ``opt.last_hypergrad_error``
  reports the rounding-error bound of each estimate. Weights are restored bit-exactly. The
  second pass draws the first one's dropout masks and leaves no trace in module buffers or
  the random generators, so the closure counts once, as in the other modes (the buffers
  then hold what a pass at ``w + r Zw`` left, within O(r) of a pass at ``w``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .compiled import explained_jvp_hypergrad
from .hvp import (
    RngReplay, _fd_step, call_closure, exact_float32, restored_buffers, swapped_parameters,
)

HYPERGRAD_MODES = ("grad", "jvp", "fd")


def validation_gradient(val_closure: Callable[[], Tensor], params: Sequence[Tensor]) -> list[Optional[Tensor]]:
    with torch.enable_grad():
        loss = call_closure(val_closure, "val_closure")
        return [None if g is None else g.detach()
                for g in torch.autograd.grad(loss, params, allow_unused=True)]


@explained_jvp_hypergrad  # a compiled validation closure: a clear error naming the alternatives
def jvp_hypergrad(val_closure, params: Sequence[Tensor], tangents: Sequence[Tensor], model) -> Tensor:
    with torch.no_grad(), fwAD.dual_level():
        duals = {id(p): fwAD.make_dual(p.detach(), z) for p, z in zip(params, tangents)}
        with swapped_parameters(model, duals):
            loss = call_closure(val_closure, "val_closure")
        tangent = fwAD.unpack_dual(loss).tangent
    if tangent is None:  # E does not depend on the parameters
        return torch.zeros((), dtype=torch.float64, device=params[0].device)
    return tangent.to(torch.float64)


def fd_hypergrad(val_closure, params: Sequence[Tensor], tangents: Sequence[Tensor],
                 model: Optional[torch.nn.Module] = None):
    """Returns (h, err): err bounds the rounding error of the difference,
    ``eps (|E+| + |E-|) / 2r`` with eps the loss dtype's machine epsilon (the truncation
    error is O(r^2) and far smaller at the chosen r). ``model``: whose buffers the second
    pass must not move (None: those of every module it runs)."""
    w = [p.detach() for p in params]
    saved = [x.clone() for x in w]
    r = _fd_step(w, tangents)
    step = torch._foreach_mul(list(tangents), r)
    rng = RngReplay([p.device for p in params])
    try:
        with torch.no_grad(), exact_float32():
            torch._foreach_add_(w, step)
            e_plus = call_closure(val_closure, "val_closure")
            loss_dtype = e_plus.dtype
            e_plus = e_plus.double()
            torch._foreach_copy_(w, saved)
            torch._foreach_sub_(w, step)
            with rng.replay(), restored_buffers(model):
                e_minus = call_closure(val_closure, "val_closure").double()
    finally:
        with torch.no_grad():
            torch._foreach_copy_(w, saved)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    h = torch.where(r > 0, (e_plus - e_minus) / (2 * safe_r), torch.zeros_like(r))
    eps = torch.finfo(loss_dtype).eps
    err = torch.where(r > 0, eps * (e_plus.abs() + e_minus.abs()) / (2 * safe_r), torch.zeros_like(r))
    return h, err
