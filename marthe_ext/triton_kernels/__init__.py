"""Triton kernels of marthe_ext (``@triton.jit`` only; host launchers live in
``marthe_ext.backends.triton_backend``).

- ``dynamics``: the per-element maths, one helper per dynamics;
- ``fused_update``: the fused multi-tensor update kernels, one per dynamics family;
- ``reductions``: ``clipped_dot`` and ``all_finite`` partial reductions;
- ``_common``: the multi-tensor chunk layout, dtype conversions, coefficient layouts;
- ``tables``: host-side pointer and chunk tables (no Triton needed).
"""
from .fused_update import _adam_update_kernel, _sgd_update_kernel, _sgdm_update_kernel
from .reductions import _all_finite_kernel, _clipped_dot_kernel

__all__ = [
    "_adam_update_kernel", "_sgd_update_kernel", "_sgdm_update_kernel",
    "_all_finite_kernel", "_clipped_dot_kernel",
]
