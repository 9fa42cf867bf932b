"""The update path as ``torch.library`` custom ops, so ``torch.compile`` and CUDA graphs see it.

Three ops, each declared once, each dispatching at run time to the backend named by its
first argument (``"torch"``, ``"triton"``, ``"cuda"``, ``"cpu"``: ``backends/``):

* ``marthe::fused_update_`` -- ``Backend.fused_update_`` (in place; the mutated lists are
  declared in ``mutates_args``, so compiled graphs functionalise and re-inplace it);
* ``marthe::clipped_dot`` -- ``Backend.clipped_dot``, a new 0-dim tensor;
* ``marthe::all_finite`` -- ``Backend.all_finite``, a new 0-dim bool tensor.

A custom op's schema holds tensors, lists of tensors and host numbers/strings only, so the
backend objects' arguments are spelled out: ``GroupOptions`` as its fields (``str``,
``float``, ``Optional[float]``, ``bool``); ``GroupBuffers.state`` (a tuple of lists) as one
flat list, the per-dynamics lists one after another (``STATE_NAMES`` order); "no HVP"
(``hvps=None``) and "no extra term" as an empty list (a schema has no optional list of
tensors). ``coeffs`` stays a device tensor: eta, mu, the bias corrections and the apply
flag change every step without recompiling or re-capturing anything.

The fake kernels say what the outputs are (dtype, device, shape) without running a
backend; ``tests/test_ops.py`` runs ``torch.library.opcheck`` on every op and backend.

The LR update (``controller.lr_update_``) is not an op: it is plain tensor code that
``torch.compile`` traces and fuses by itself (``fused_lr.py``), as is ``make_coeffs``.
"""
from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch
from torch import Tensor

from .backends import load_backend
from .backends.api import STATE_NAMES, GroupBuffers, GroupOptions

OP_BACKENDS = ("torch", "triton", "cuda", "cpu")

_instances: dict[str, object] = {}
_lock = threading.Lock()


def _backend(name: str):
    """One shared instance per backend name: an op cannot carry a Python object, and what a
    backend caches (Triton's pointer tables) is keyed by addresses, right for any caller."""
    if name not in OP_BACKENDS:
        raise ValueError(f"marthe ops: backend must be one of {OP_BACKENDS}, got {name!r}")
    with _lock:
        if name not in _instances:
            _instances[name] = load_backend(name)
        return _instances[name]


def _unflatten_state(dynamics: str, flat: Sequence[Tensor], n: int, what: str) -> tuple:
    if dynamics not in STATE_NAMES:
        raise ValueError(
            f"marthe ops: dynamics must be one of {tuple(STATE_NAMES)}, got {dynamics!r}")
    k = len(STATE_NAMES[dynamics])
    if len(flat) != k * n:
        raise ValueError(f"marthe ops: {dynamics} takes {k} {what} list(s) of {n} tensors "
                         f"({STATE_NAMES[dynamics]}, flattened), got {len(flat)} tensors")
    return tuple(list(flat[i * n:(i + 1) * n]) for i in range(k))


def _buffers(dynamics, params, grads, hvps, tangents, state, state_tangents) -> GroupBuffers:
    """The op's flat arguments as ``GroupBuffers``, with the list lengths checked (eagerly
    and at trace time, by the fake kernel): a backend would otherwise zip them short."""
    n = len(params)
    for name, lst in (("grads", grads), ("tangents", tangents), ("hvps", hvps)):
        if len(lst) != n and not (name == "hvps" and not lst):
            raise ValueError(f"marthe ops: {name} has {len(lst)} tensors, params has {n}"
                             + (" (hvps: [] for none)" if name == "hvps" else ""))
    return GroupBuffers(
        params=list(params), grads=list(grads), hvps=list(hvps) if hvps else None,
        tangents=list(tangents), state=_unflatten_state(dynamics, state, n, "state"),
        state_tangents=_unflatten_state(dynamics, state_tangents, n, "state tangent"))


def _acc_dtype(a: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if not a or a[0].dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ fused update
@torch.library.custom_op("marthe::fused_update_",
                         mutates_args=("params", "tangents", "state", "state_tangents"))
def fused_update_op(
    backend: str, dynamics: str, params: Sequence[Tensor], grads: Sequence[Tensor],
    hvps: Sequence[Tensor], tangents: Sequence[Tensor], state: Sequence[Tensor],
    state_tangents: Sequence[Tensor], coeffs: Tensor,
    weight_decay: float, grad_clip: Optional[float], momentum: float, nesterov: bool,
    beta1: float, beta2: float, eps: float,
) -> None:
    """``Backend.fused_update_`` (SPEC section 2, step 4); ``hvps=[]`` means hz = 0."""
    opts = GroupOptions(dynamics=dynamics, weight_decay=weight_decay, grad_clip=grad_clip,
                        momentum=momentum, nesterov=nesterov, beta1=beta1, beta2=beta2, eps=eps)
    bufs = _buffers(dynamics, params, grads, hvps, tangents, state, state_tangents)
    _backend(backend).fused_update_(opts, bufs, coeffs)


@fused_update_op.register_fake
def _(backend, dynamics, params, grads, hvps, tangents, state, state_tangents, coeffs,
      weight_decay, grad_clip, momentum, nesterov, beta1, beta2, eps) -> None:
    # Checked at trace time too, so a compiled step fails where an eager one would.
    _buffers(dynamics, params, grads, hvps, tangents, state, state_tangents)


def fused_update_(backend: str, opts: GroupOptions, bufs: GroupBuffers, coeffs: Tensor) -> None:
    """``Backend.fused_update_(opts, bufs, coeffs)`` through ``marthe::fused_update_``."""
    flat = lambda lists: [t for lst in lists for t in lst]  # noqa: E731
    fused_update_op(
        backend, opts.dynamics, list(bufs.params), list(bufs.grads),
        [] if bufs.hvps is None else list(bufs.hvps), list(bufs.tangents), flat(bufs.state),
        flat(bufs.state_tangents), coeffs, float(opts.weight_decay),
        None if opts.grad_clip is None else float(opts.grad_clip), float(opts.momentum),
        bool(opts.nesterov), float(opts.beta1), float(opts.beta2), float(opts.eps))


# ------------------------------------------------------------------ reductions
@torch.library.custom_op("marthe::clipped_dot", mutates_args=())
def clipped_dot_op(backend: str, a: Sequence[Tensor], b: Sequence[Tensor],
                   a_extra: Sequence[Tensor], a_extra_scale: float, clip: Optional[float],
                   clip_b: bool) -> Tensor:
    """``Backend.clipped_dot``; ``a_extra=[]`` means no extra term. 0-dim, float64 for
    float64 ``a`` (and for empty lists, on the CPU), float32 otherwise."""
    if len(a) != len(b):
        raise ValueError(f"clipped_dot: a has {len(a)} tensors, b {len(b)}")
    out = _backend(backend).clipped_dot(
        list(a), list(b), clip=clip, a_extra=list(a_extra) if a_extra else None,
        a_extra_scale=a_extra_scale if a_extra else 0.0, clip_b=clip_b)
    return out.to(_acc_dtype(a))  # one dtype whatever the backend (a no-op for all of them)


@clipped_dot_op.register_fake
def _(backend, a, b, a_extra, a_extra_scale, clip, clip_b) -> Tensor:
    if len(a) != len(b):
        raise ValueError(f"clipped_dot: a has {len(a)} tensors, b {len(b)}")
    device = a[0].device if a else torch.device("cpu")
    return torch.empty((), dtype=_acc_dtype(a), device=device)


def clipped_dot(backend: str, a: Sequence[Tensor], b: Sequence[Tensor], *,
                clip: Optional[float] = None, a_extra: Optional[Sequence[Tensor]] = None,
                a_extra_scale: float = 0.0, clip_b: bool = False) -> Tensor:
    """``Backend.clipped_dot`` (same keywords) through ``marthe::clipped_dot``."""
    extra = list(a_extra) if a_extra is not None and a_extra_scale != 0 else []
    return clipped_dot_op(backend, list(a), list(b), extra, float(a_extra_scale),
                          None if clip is None else float(clip), bool(clip_b))


@torch.library.custom_op("marthe::all_finite", mutates_args=())
def all_finite_op(backend: str, tensors: Sequence[Tensor]) -> Tensor:
    """``Backend.all_finite([tensors])``: 0-dim bool on the first tensor's device (the CPU
    for an empty list)."""
    if not any(t.numel() for t in tensors):  # the backends differ in where this answer lives
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")
    return _backend(backend).all_finite([list(tensors)])


@all_finite_op.register_fake
def _(backend, tensors) -> Tensor:
    return torch.empty((), dtype=torch.bool, device=tensors[0].device if tensors else "cpu")


def all_finite(backend: str, lists: Sequence[Sequence[Tensor]]) -> Tensor:
    """``Backend.all_finite(lists)`` through ``marthe::all_finite``."""
    return all_finite_op(backend, [t for lst in lists for t in lst])


__all__ = ["OP_BACKENDS", "fused_update_", "clipped_dot", "all_finite",
           "fused_update_op", "clipped_dot_op", "all_finite_op"]
