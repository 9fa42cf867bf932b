"""Gradient and Hessian-vector product engines (SPEC section 3).

Each engine evaluates the training closure once (twice for "fd") and returns the loss,
the gradient ``g = grad L(w)`` and ``H Zw`` for the optimizer's parameters:

* "reverse": gradient with ``create_graph=True``, then a second backward along ``Zw``.
  Works for every model; keeps the double-backward graph (most memory).
* "forward": forward-over-reverse with ``torch.autograd.forward_ad`` dual parameters and
  one ordinary backward; the gradient's tangent is ``H Zw``. The closure runs the model
  once, so BatchNorm statistics and dropout masks are those of a plain training step.
  Needs the ``nn.Module`` (``Marthe(model=...)``) to put the dual parameters in it.
* "fd": ``(grad L(w + r Zw) - grad L(w)) / r``, two plain backward passes, least memory,
  approximate (truncation and rounding error). The closure's RNG state is replayed so
  dropout draws the same mask; weights and module buffers are restored bit-exactly.

Entries of ``grads`` are None for parameters the loss does not depend on; entries of
``hvps`` are None where the HVP is exactly zero. ``hvps`` itself is None when no HVP was
asked for.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _profiling

HVP_ENGINES = ("auto", "reverse", "forward", "fd")


def call_closure(closure: Callable[[], Tensor], what: str = "closure") -> Tensor:
    """Run a loss closure and check it returned a real scalar tensor."""
    loss = closure()
    if not isinstance(loss, Tensor):
        raise TypeError(f"{what} must return the loss as a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{what} must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise TypeError(f"{what} must return a floating-point loss, got {loss.dtype}")
    return loss.reshape(())


@contextlib.contextmanager
def swapped_parameters(model: torch.nn.Module, replacement: dict[int, Tensor]):
    """Temporarily put ``replacement[id(p)]`` in every place ``model`` holds ``p``.

    Tied weights are handled (every module slot holding the parameter is swapped).
    """
    saved = []
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in replacement:
                    saved.append((module, name, p))
                    module._parameters[name] = replacement[id(p)]
        yield
    finally:
        for module, name, p in saved:
            module._parameters[name] = p


def check_model_holds(model: torch.nn.Module, params: Sequence[Tensor]) -> None:
    held = {id(p) for p in model.parameters()}
    missing = sum(id(p) not in held for p in params)
    if missing:
        raise ValueError(
            f"model= does not hold {missing} of the optimizer's parameters: pass the module "
            f"whose parameters are being optimized")


@contextlib.contextmanager
def preserved_buffers(model: torch.nn.Module):
    """Evaluate ``model`` without letting it change its buffers (BatchNorm running stats).

    For validation closures in train mode: the validation loss uses batch statistics like
    the training loss, but must not leak validation data into the running averages (nor
    move them a second time per step). Inside the block every module holds throw-away
    copies of its buffers; the autograd graph keeps referring to those copies, so the
    optimizer can still differentiate the loss after the real buffers are back (restoring
    them in place instead would break its backward pass)::

        def val_closure():
            with marthe_ext.preserved_buffers(model):
                return loss_fn(model(x_val), y_val)
    """
    saved = []
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                saved.append((module, name, buf))
                module._buffers[name] = buf.clone()
    try:
        yield
    finally:
        for module, name, buf in saved:
            module._buffers[name] = buf


@contextlib.contextmanager
def exact_float32():
    """Switch TF32 off for matmuls and cuDNN convolutions (finite differences of float32
    quantities are otherwise dominated by TF32's 10-bit mantissa rounding)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


@contextlib.contextmanager
def replayed_rng(devices: Sequence[torch.device]):
    """Yield a function that rewinds the RNG to its state at entry (dropout masks repeat).

    Nothing is restored on exit: after the last replay the generators stand where one
    evaluation of the closure leaves them, so the next step draws fresh randomness.
    """
    cuda_ids = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(i) for i in cuda_ids]

    def rewind():
        torch.set_rng_state(cpu_state)
        for i, s in zip(cuda_ids, cuda_states):
            torch.cuda.set_rng_state(s, i)

    yield rewind


def _grad(loss: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> list[Optional[Tensor]]:
    return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True))


def reverse_engine(closure, params, tangents, need_hvp: bool, model=None):
    with torch.enable_grad():
        with _profiling.phase("gradient"):
            loss = call_closure(closure)
            grads = _grad(loss, params, create_graph=need_hvp)
        if not need_hvp:
            return loss.detach(), grads, None
        idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        hvps: list[Optional[Tensor]] = [None] * len(params)
        if idx:
            with _profiling.phase("hvp"):
                out = torch.autograd.grad(
                    [grads[i] for i in idx], params,
                    grad_outputs=[tangents[i] for i in idx], allow_unused=True)
            hvps = list(out)
    return loss.detach(), [None if g is None else g.detach() for g in grads], hvps


def forward_engine(closure, params, tangents, need_hvp: bool, model=None):
    if model is None:
        raise ValueError("hvp='forward' needs the model: Marthe(..., model=my_module)")
    if not need_hvp:
        return reverse_engine(closure, params, tangents, False)
    with _profiling.phase("gradient+hvp"), torch.enable_grad(), fwAD.dual_level():
        duals = {id(p): fwAD.make_dual(p, z) for p, z in zip(params, tangents)}
        with swapped_parameters(model, duals):
            loss = call_closure(closure)
        grads = _grad(loss, params)
        out_g, out_h = [], []
        for g in grads:
            if g is None:
                out_g.append(None)
                out_h.append(None)
                continue
            primal, tangent = fwAD.unpack_dual(g)
            out_g.append(primal.detach())
            out_h.append(None if tangent is None else tangent.detach())
        loss_primal = fwAD.unpack_dual(loss).primal.detach()
    return loss_primal, out_g, out_h


def _fd_step(params: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor:
    """r = sqrt(machine eps) * (1 + ||w||) / ||Zw||, as a device scalar (0 when Zw = 0)."""
    dtype = params[0].dtype
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    w_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(params))).double())
    z_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tangents))).double())
    r = eps ** 0.5 * (1 + w_norm) / z_norm
    return torch.where(z_norm > 0, r, torch.zeros_like(r))


def module_buffers(model: Optional[torch.nn.Module]) -> list[Tensor]:
    return [] if model is None else [b for b in model.buffers() if b is not None]


def fd_engine(closure, params, tangents, need_hvp: bool, model=None):
    if not need_hvp:
        return reverse_engine(closure, params, tangents, False)
    with replayed_rng([p.device for p in params]) as rewind, exact_float32():
        with _profiling.phase("gradient"), torch.enable_grad():
            loss = call_closure(closure)
            grads = _grad(loss, params)
        # The first evaluation is the training step: its buffer updates (BatchNorm running
        # statistics) are kept; the probe's are undone.
        buffers = module_buffers(model)
        saved_buffers = [b.clone() for b in buffers]
        saved_params = [p.detach().clone() for p in params]
        r = _fd_step([p.detach() for p in params], tangents)
        with torch.no_grad():
            torch._foreach_add_([p.detach() for p in params], torch._foreach_mul(list(tangents), r))
        rewind()
        try:
            with _profiling.phase("hvp"), torch.enable_grad():
                grads_probe = _grad(call_closure(closure), params)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved_params):
                    p.copy_(s)
                for b, s in zip(buffers, saved_buffers):
                    b.copy_(s)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    hvps = []
    for g, gp in zip(grads, grads_probe):
        if g is None or gp is None:
            hvps.append(None)
        else:
            hvps.append(torch.where(r > 0, (gp - g) / safe_r.to(g.dtype), 0))
    return loss.detach(), [None if g is None else g.detach() for g in grads], hvps


ENGINES = {"reverse": reverse_engine, "forward": forward_engine, "fd": fd_engine}
EXACT_ENGINES = ("reverse", "forward")


def time_engines(closure, params, tangents, model=None):
    """Run every exact engine that can work here once on this step's batch and time it.

    The RNG is replayed for each run (same dropout mask) and module buffers are restored to
    the state the first run left, so the step counts once. Returns (the first run's
    result, the fastest engine's name, {name: seconds}, {name: reason it failed}).
    """
    import time

    names = [n for n in EXACT_ENGINES if n != "forward" or model is not None]
    devices = [p.device for p in params]
    on_cuda = any(d.type == "cuda" for d in devices)
    buffers = module_buffers(model)
    before = [b.clone() for b in buffers]
    result, after, timings, failures = None, None, {}, {}
    with replayed_rng(devices) as rewind:
        for name in names:
            rewind()
            with torch.no_grad():
                for b, s in zip(buffers, before):
                    b.copy_(s)
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                out = ENGINES[name](closure, params, tangents, True, model)
            except (RuntimeError, NotImplementedError) as exc:
                failures[name] = f"{type(exc).__name__}: {exc}"
                continue
            if on_cuda:
                torch.cuda.synchronize()
            timings[name] = time.perf_counter() - start
            if result is None:
                result, after = out, [b.clone() for b in buffers]
    if result is None:
        raise RuntimeError(f"no HVP engine works for this model: {failures}")
    with torch.no_grad():
        for b, s in zip(buffers, after):
            b.copy_(s)
    return result, min(timings, key=timings.get), timings, failures
