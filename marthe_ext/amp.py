"""Dynamic loss scaling for float16 autocast (``Marthe(loss_scale="dynamic")``).

Under ``torch.autocast(dtype=torch.float16)`` small gradients underflow to zero in the
float16 parts of the backward pass. ``torch.amp.GradScaler`` fixes that for optimizers fed
by ``scaler.scale(loss).backward()``; MARTHE differentiates the closure's loss itself
(gradient AND Hessian-vector product), so the scaling is built into the step instead, with
GradScaler's rule and defaults:

* the engines differentiate ``S * loss`` (S a power of two, float32, on the device); the
  gradient, the HVP and the returned loss are divided by S before anything uses them
  (clipping, the finite check, the hypergradient, the fused update). Multiplying by a
  power of two is exact in floating point, so without autocast the step is bit-identical
  to an unscaled one as long as nothing overflows;
* a step whose gradient or HVP is not finite is skipped, as every non-finite step is
  (``opt.skipped_steps`` counts it), and S is multiplied by ``backoff_factor``; after
  ``growth_interval`` finite steps in a row S is multiplied by ``growth_factor``
  (``torch._amp_update_scale_``, GradScaler's own kernel: no host sync);
* S and the count of finite steps are in the optimizer's ``state_dict``.

The validation loss is not scaled: its gradient only enters the scalar hypergradient,
whose non-finite values skip the LR update (and the step) like any other.

Backward style: scale the loss yourself, ``opt.scale_loss(loss).backward(...)``; the
gradient and HVP read from ``.grad`` and the graph are then unscaled the same way.
bfloat16 autocast needs no scaling (float32's exponent range).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class DynamicLossScale:
    """The rule's constants; ``Marthe(loss_scale="dynamic")`` uses these defaults
    (GradScaler's). ``init_scale`` is rounded to a power of two (scaling stays exact)."""

    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self):
        def real(name, value):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise TypeError(f"DynamicLossScale.{name} must be a finite real number, got {value!r}")
        for name in ("init_scale", "growth_factor", "backoff_factor"):
            real(name, getattr(self, name))
        if not 2.0 ** -126 <= self.init_scale <= 2.0 ** 127:
            raise ValueError(f"DynamicLossScale.init_scale must be in [2**-126, 2**127] (a float32 "
                             f"power of two), got {self.init_scale}")
        if self.growth_factor < 1.0 or not math.log2(self.growth_factor).is_integer():
            raise ValueError(f"DynamicLossScale.growth_factor must be a power of two >= 1 (scaling "
                             f"stays exact), got {self.growth_factor}")
        if not 0.0 < self.backoff_factor < 1.0 or not math.log2(self.backoff_factor).is_integer():
            raise ValueError(f"DynamicLossScale.backoff_factor must be a power of two in (0, 1), "
                             f"got {self.backoff_factor}")
        if isinstance(self.growth_interval, bool) or not isinstance(self.growth_interval, int) \
                or self.growth_interval < 1:
            raise ValueError(f"DynamicLossScale.growth_interval must be an int >= 1, got "
                             f"{self.growth_interval!r}")


LossScaleOption = Union[None, str, DynamicLossScale]


class LossScaler:
    """The scale S and the count of finite steps, on the device, and what uses them."""

    def __init__(self, rule: DynamicLossScale, device: torch.device):
        self.rule = rule
        s = 2.0 ** round(math.log2(rule.init_scale))
        self.scale = torch.full((), s, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    @classmethod
    def from_option(cls, option: LossScaleOption, device: torch.device) -> Optional["LossScaler"]:
        """None (no scaling), "dynamic" (the defaults) or a DynamicLossScale."""
        if option is None:
            return None
        if isinstance(option, str):
            if option != "dynamic":
                raise ValueError(f"loss_scale must be None, 'dynamic' or a "
                                 f"marthe_ext.DynamicLossScale, got {option!r}")
            return cls(DynamicLossScale(), device)
        if isinstance(option, DynamicLossScale):
            return cls(option, device)
        raise TypeError(f"loss_scale must be None, 'dynamic' or a marthe_ext.DynamicLossScale, "
                        f"got {type(option).__name__}")

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``S * loss``, in float32 at least (a float16 loss times 2**16 would overflow)."""
        return loss.to(torch.promote_types(loss.dtype, torch.float32)) * self.scale

    def scaled(self, closure: Optional[Callable[[], Tensor]]) -> Optional[Callable[[], Tensor]]:
        """``closure`` returning ``S * loss`` (None stays None). A non-tensor result is passed
        through for the engines' own check to reject with its usual message."""
        if closure is None:
            return None

        def scaled_closure():
            loss = closure()
            return self.scale_loss(loss) if isinstance(loss, Tensor) else loss

        return scaled_closure

    def unscale(self, loss: Optional[Tensor], grads: Sequence[Optional[Tensor]],
                hvps: Optional[Sequence[Optional[Tensor]]]):
        """``(loss / S, grads / S, hvps / S)``; new tensors (``.grad`` of the caller is untouched)."""
        inv = self.scale.reciprocal()

        def div(ts):
            if ts is None:
                return None
            present = [i for i, t in enumerate(ts) if t is not None]
            out = list(ts)
            if present:
                for i, t in zip(present, torch._foreach_mul([ts[i] for i in present], inv)):
                    out[i] = t
            return out

        return (None if loss is None else loss * inv), div(grads), div(hvps)

    def update(self, ok: Tensor) -> None:
        """Back off where ``ok`` is False, grow after ``growth_interval`` finite steps."""
        found_inf = (~ok).to(torch.float32)
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf,
                                 self.rule.growth_factor, self.rule.backoff_factor,
                                 self.rule.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.detach().clone(), "growth_tracker": self.growth_tracker.detach().clone()}

    @staticmethod
    def check_state_dict(saved) -> None:
        if not isinstance(saved, dict) or set(saved) != {"scale", "growth_tracker"}:
            raise ValueError("the state dict's 'loss_scale' entry must hold 'scale' and 'growth_tracker'")

    def load_state_dict(self, saved: dict) -> None:
        self.scale.copy_(saved["scale"])
        self.growth_tracker.copy_(saved["growth_tracker"])
