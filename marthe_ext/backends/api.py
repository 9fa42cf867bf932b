"""The contract between the optimizer and its backends.

Every backend (torch reference, Triton, CUDA C++, CPU C++) implements the same three
operations on lists of tensors of one parameter group; the optimizer never does
per-element maths itself.

* ``fused_update_(opts, bufs, coeffs)`` -- SPEC section 2, step 4, in place: for every
  element, add the coupled weight decay to ``g`` and ``hz``, clip, then update the weight,
  the optimizer state and the tangent (``Z <- mu A Z + B``).
* ``clipped_dot(a, b, ...)`` -- the hypergradient's reductions, ``<clip(a + s x), clip?(b)>``.
* ``all_finite(lists)`` -- one device boolean: every element of every tensor is finite.

Scalars that change during training (eta, mu, Adam's bias corrections, the "apply"
flag) arrive as one small float64 tensor ``coeffs`` on the parameters' device, laid out
by the ``COEFF_*`` indices below: a kernel reads them from memory, so the host never
waits for the device. Hyperparameters fixed by the user (weight decay, clip, momentum,
betas, eps) are host floats in ``GroupOptions``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor

DYNAMICS = ("sgd", "sgdm", "adam", "adamw")

# Layout of the per-group ``coeffs`` tensor (float64, shape (N_COEFFS,), on the device).
COEFF_ETA = 0    # eta_G = eta * lr_scale, the step size this step uses
COEFF_MU = 1     # mu, the tangent's discount
COEFF_SCALE = 2  # s_G = lr_scale: d eta_G / d eta
COEFF_BC1 = 3    # Adam: 1 - beta1 ** k (k = step count after increment); 1 otherwise
COEFF_BC2 = 4    # Adam: 1 - beta2 ** k; 1 otherwise
COEFF_OK = 5     # 1.0: apply the step; 0.0: leave every buffer bit-identical
N_COEFFS = 6

# Names of the per-dynamics state lists, in the order of ``GroupBuffers.state``.
STATE_NAMES = {
    "sgd": (),
    "sgdm": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
}


@dataclass(frozen=True)
class GroupOptions:
    """Host-side hyperparameters of one parameter group (constant during training)."""

    dynamics: str
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None  # elementwise clip c; None = no clipping
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @property
    def coupled_weight_decay(self) -> float:
        """The L2 coefficient added to g (and to hz): all dynamics but adamw."""
        return 0.0 if self.dynamics == "adamw" else self.weight_decay


@dataclass
class GroupBuffers:
    """Aligned lists (same length, same shapes index by index, one device and dtype family).

    ``hvps`` holds the raw Hessian-vector products ``H Zw`` (without weight decay, before
    clipping); ``None`` means hz = 0 exactly (HD, or a zero tangent). ``state`` and
    ``state_tangents`` follow ``STATE_NAMES[dynamics]``. State and tangents may be float32
    while params/grads are bfloat16 (low-precision params keep full-precision state).
    """

    params: list[Tensor]
    grads: list[Tensor]
    hvps: Optional[list[Tensor]]
    tangents: list[Tensor]
    state: tuple[list[Tensor], ...] = field(default_factory=tuple)
    state_tangents: tuple[list[Tensor], ...] = field(default_factory=tuple)


class Backend(Protocol):
    name: str

    def fused_update_(self, opts: GroupOptions, bufs: GroupBuffers, coeffs: Tensor) -> None:
        ...

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
        """``sum_i <clip(a_i + a_extra_scale * a_extra_i), clip?(b_i)>`` as a 0-dim tensor.

        ``clip`` None means no clipping; ``clip_b`` applies the same clip to ``b``.
        Accumulates in float64 for float64 inputs and at least float32 otherwise.
        """
        ...

    def all_finite(self, lists: Sequence[Sequence[Tensor]]) -> Tensor:
        """0-dim bool tensor: no NaN or Inf in any tensor of any list."""
        ...


def make_coeffs(
    *,
    eta: Tensor,
    mu: Tensor,
    lr_scale: float,
    step: Tensor,
    opts: GroupOptions,
    ok: Tensor,
) -> Tensor:
    """Build one group's ``coeffs`` on the device from device scalars (no host sync).

    ``step`` is the step count after this step's increment (k >= 1 when the step applies).
    """
    one = torch.ones((), dtype=torch.float64, device=eta.device)
    if opts.dynamics in ("adam", "adamw"):
        k = torch.clamp(step, min=1.0)  # a skipped first step still gets finite coefficients
        bc1 = one - torch.pow(opts.beta1, k)
        bc2 = one - torch.pow(opts.beta2, k)
    else:
        bc1 = bc2 = one
    return torch.stack(
        [eta * lr_scale, mu, one * lr_scale, bc1, bc2, ok.to(torch.float64)]
    )
