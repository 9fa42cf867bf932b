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
  approximate (truncation and rounding error). The probe draws the first evaluation's
  dropout masks and leaves no trace: weights, module buffers (those of ``model``, or of
  every module the probe runs) and the random generators are put back, so the step counts
  once, as a plain training step.
* "reverse-eager", "forward-eager": the exact engines with ``torch.compile``d code run
  eagerly for the step that takes an HVP (torch cannot differentiate compiled code twice
  or in forward mode; see compiled.py).

Entries of ``grads`` are None for parameters the loss does not depend on; entries of
``hvps`` are None where the HVP is exactly zero. ``hvps`` itself is None when no HVP was
asked for.

``on_gradients(hook)``: inside the block, the engines that finish the gradient before they
start the HVP ("reverse", "fd" and "reverse-eager") call ``hook(loss, grads)`` right then
(detached), so that the caller may start using the gradient -- data parallelism launches
its all-reduce (``distributed.py``) -- while the HVP is computed. "forward" produces both
together and calls nothing.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from . import _profiling
from . import compiled as _compiled

HVP_ENGINES = ("auto", "reverse", "forward", "fd", "reverse-eager", "forward-eager")


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


# TF32 is a process-wide switch (torch keeps no per-thread setting). Overlapping blocks in
# several threads share one "off" period: the first to enter saves the flags and switches TF32
# off, the last to leave puts the saved flags back. Without the count, a thread leaving first
# would switch TF32 back on under the others, and the last would leave it off for good.
_tf32_lock = threading.Lock()
_tf32_depth = 0
_tf32_saved: tuple[bool, bool] = (False, False)


@contextlib.contextmanager
def exact_float32():
    """Switch TF32 off for matmuls and cuDNN convolutions (finite differences of float32
    quantities are otherwise dominated by TF32's 10-bit mantissa rounding).

    The flags are process-wide: they are put back when the last overlapping block (in any
    thread) ends. A change another thread makes to them meanwhile is overwritten then."""
    global _tf32_depth, _tf32_saved
    with _tf32_lock:
        if _tf32_depth == 0:
            _tf32_saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        _tf32_depth += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_depth -= 1
            if _tf32_depth == 0:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _tf32_saved


class RngReplay:
    """The CPU generator and the CUDA generators of ``devices``, captured at construction, so
    that a second evaluation of a closure draws the same dropout masks as the first.

    ``replay()`` puts the generators back where they stood before it, so after any number of
    replays they stand where one evaluation of the closure (the one outside the replays)
    leaves them: the next step draws fresh randomness, whatever the replays drew.

    torch's default generators are process-wide: draws made by other threads while a replay
    runs are undone with it.
    """

    def __init__(self, devices: Sequence[torch.device]):
        self._cuda_ids = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        self._cpu_state = torch.get_rng_state()
        self._cuda_states = [torch.cuda.get_rng_state(i) for i in self._cuda_ids]

    def rewind(self) -> None:
        """Set the generators to the captured state; nothing is undone later."""
        torch.set_rng_state(self._cpu_state)
        for i, s in zip(self._cuda_ids, self._cuda_states):
            torch.cuda.set_rng_state(s, i)

    @contextlib.contextmanager
    def replay(self):
        """Inside: the generators start from the captured state. On exit (also on an
        error): they are back where they stood at entry."""
        with torch.random.fork_rng(devices=self._cuda_ids, device_type="cuda"):
            self.rewind()
            yield


class _BufferSnapshot:
    """Copies of module buffers, taken before they can change, and their in-place restore."""

    def __init__(self):
        self._saved: dict[int, tuple[Tensor, Tensor]] = {}  # id(buffer) -> (buffer, copy)
        # Held, not only their ids, so that no module made inside the block reuses an id.
        self._modules: dict[int, torch.nn.Module] = {}

    def add(self, module: torch.nn.Module) -> None:
        """Save the buffers of ``module`` and its submodules not saved yet."""
        for m in module.modules():
            if id(m) in self._modules:
                continue
            self._modules[id(m)] = m
            for b in m._buffers.values():
                if b is not None and id(b) not in self._saved:
                    self._saved[id(b)] = (b, b.detach().clone())

    def restore(self) -> None:
        # In place, so that whoever holds a buffer (the module, an optimizer, a user's
        # reference) sees the restored values. Copying unchanged buffers back costs less
        # than finding out which changed (a comparison would wait for the device).
        with torch.no_grad():
            for b, copy in self._saved.values():
                b.copy_(copy)


@contextlib.contextmanager
def _buffer_snapshot(model: Optional[torch.nn.Module]):
    """Yield a _BufferSnapshot of what the block may change; restore it on an error.

    With ``model``: its buffers, saved at entry. Without: the buffers of every module whose
    forward runs inside the block in this thread (and of its submodules), each saved by a
    global forward pre-hook just before the module's first call. Buffers a closure changes
    without calling the module that holds them are not seen then: pass ``model``.
    """
    snapshot = _BufferSnapshot()
    handle = None
    if model is not None:
        snapshot.add(model)
    else:
        owner = threading.get_ident()

        def save_before_forward(module, args):
            if threading.get_ident() == owner:  # other threads' modules are theirs
                snapshot.add(module)

        handle = register_module_forward_pre_hook(save_before_forward)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
    finally:
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def restored_buffers(model: Optional[torch.nn.Module]):
    """On exit, put back every module buffer (BatchNorm running statistics) changed inside.

    For evaluations that must not count as a training step: the "fd" probe, an HVP closure,
    engine timing. With ``model``: its buffers. With None: those of every module that runs
    inside the block in this thread (see _buffer_snapshot). Restored in place after the
    block: a graph built inside that saved a buffer cannot be differentiated after it, so
    finish the backward passes inside (for a loss that must stay differentiable, see
    preserved_buffers).
    """
    with _buffer_snapshot(model) as snapshot:
        yield
        snapshot.restore()  # on an error, _buffer_snapshot restores


_gradients_hook: contextvars.ContextVar = contextvars.ContextVar("marthe_gradients_hook", default=None)


@contextlib.contextmanager
def on_gradients(hook: Callable[[Tensor, list], None]):
    """Inside: ``hook(loss, grads)`` when an engine has the gradient and has yet to take the
    HVP (see the module docstring). Not called when no HVP is asked for."""
    token = _gradients_hook.set(hook)
    try:
        yield
    finally:
        _gradients_hook.reset(token)


def _gradients_ready(loss: Tensor, grads: Sequence[Optional[Tensor]]) -> None:
    hook = _gradients_hook.get()
    if hook is not None:
        hook(loss.detach(), [None if g is None else g.detach() for g in grads])


def _grad(loss: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> list[Optional[Tensor]]:
    return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True))


def hvp_through_gradients(grads: Sequence[Optional[Tensor]], params: Sequence[Tensor],
                          tangents: Sequence[Tensor]) -> Optional[list[Optional[Tensor]]]:
    """``H Zw`` by a second backward through the graph of gradients taken with
    ``create_graph=True`` (the "reverse" engine's, or ``.grad`` after
    ``loss.backward(create_graph=True)``); None when no gradient carries a graph."""
    idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not idx:
        return None
    with torch.enable_grad(), _profiling.phase("hvp"):
        return list(torch.autograd.grad([grads[i] for i in idx], list(params),
                                        grad_outputs=[tangents[i] for i in idx], allow_unused=True))


def reverse_engine(closure, params, tangents, need_hvp: bool, model=None):
    with torch.enable_grad():
        with _profiling.phase("gradient"):
            loss = call_closure(closure)
            grads = _grad(loss, params, create_graph=need_hvp)
        if not need_hvp:
            return loss.detach(), grads, None
        _gradients_ready(loss, grads)
        hvps = hvp_through_gradients(grads, params, tangents)
        if hvps is None:  # no gradient depends on the weights: H Zw = 0
            hvps = [None] * len(params)
    return loss.detach(), [None if g is None else g.detach() for g in grads], hvps


class _ZeroTangentLossTargets(TorchFunctionMode):
    """The forward engine's closure runs in this mode: ``F.mse_loss`` gets a target with an
    explicit zero tangent where it has none.

    torch's forward-mode derivative of ``mse_loss_backward`` (reduction "mean") divides the
    target's tangent in place, and a target without one has an immutable ZeroTensor there:
    forward-over-reverse then fails with "ZeroTensors are immutable" (pytorch/pytorch#123996,
    open from torch 2.3 to at least 2.15). With a real zero tangent the result is the same
    (the target's tangent is zero either way). Every other op passes through untouched."""

    _MSE = (F.mse_loss, torch._C._nn.mse_loss)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._MSE:  # every other call (the whole forward) passes straight through
            if "target" in kwargs:
                kwargs = dict(kwargs, target=_with_zero_tangent(kwargs["target"]))
            elif len(args) > 1:
                args = (args[0], _with_zero_tangent(args[1]), *args[2:])
        return func(*args, **kwargs)


def _with_zero_tangent(t):
    if isinstance(t, Tensor) and t.is_floating_point() and fwAD.unpack_dual(t).tangent is None:
        return fwAD.make_dual(t, torch.zeros_like(t))
    return t


def forward_engine(closure, params, tangents, need_hvp: bool, model=None):
    if model is None:
        raise ValueError("hvp='forward' needs the model: Marthe(..., model=my_module)")
    if not need_hvp:
        return reverse_engine(closure, params, tangents, False)
    with _profiling.phase("gradient+hvp"), torch.enable_grad(), fwAD.dual_level():
        duals = {id(p): fwAD.make_dual(p, z) for p, z in zip(params, tangents)}
        with swapped_parameters(model, duals), _ZeroTangentLossTargets():
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


def fd_engine(closure, params, tangents, need_hvp: bool, model=None):
    if not need_hvp:
        return reverse_engine(closure, params, tangents, False)
    rng = RngReplay([p.device for p in params])
    with exact_float32():
        with _profiling.phase("gradient"), torch.enable_grad():
            loss = call_closure(closure)
            grads = _grad(loss, params)
        _gradients_ready(loss, grads)
        # The first evaluation is the training step: its buffer updates (BatchNorm running
        # statistics) and random draws stand; the probe's are undone, and it draws the
        # first evaluation's dropout masks.
        saved_params = [p.detach().clone() for p in params]
        r = _fd_step([p.detach() for p in params], tangents)
        with torch.no_grad():
            torch._foreach_add_([p.detach() for p in params], torch._foreach_mul(list(tangents), r))
        try:
            with rng.replay(), restored_buffers(model), _profiling.phase("hvp"), \
                    torch.enable_grad():
                grads_probe = _grad(call_closure(closure), params)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved_params):
                    p.copy_(s)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    hvps = []
    for g, gp in zip(grads, grads_probe):
        if g is None or gp is None:
            hvps.append(None)
        else:
            hvps.append(torch.where(r > 0, (gp - g) / safe_r.to(g.dtype), 0))
    return loss.detach(), [None if g is None else g.detach() for g in grads], hvps


# The exact engines explain a failure on torch.compile'd code; their "-eager" variants
# run compiled code eagerly for the HVP step (compiled.py).
ENGINES = {"reverse": _compiled.explained("reverse", reverse_engine),
           "forward": _compiled.explained("forward", forward_engine),
           "fd": fd_engine,
           "reverse-eager": _compiled.eager(reverse_engine),
           "forward-eager": _compiled.eager(forward_engine)}
EXACT_ENGINES = ("reverse", "forward")


def time_engines(closure, params, tangents, model=None):
    """Run every exact engine that can work here once on this step's batch and time it.

    The first engine that works is this step's evaluation: its buffer updates and random
    draws stand. The others run with the same RNG state (same dropout mask) and leave no
    trace (module buffers and generators are put back), so the step counts once. A failed
    attempt leaves no trace either. Returns (the first working engine's result, the fastest
    engine's name, {name: seconds}, {name: reason it failed}).
    """
    import time

    names = [n for n in EXACT_ENGINES if n != "forward" or model is not None]
    devices = [p.device for p in params]
    on_cuda = any(d.type == "cuda" for d in devices)
    rng = RngReplay(devices)
    result, timings, failures = None, {}, {}
    for name in names:
        counted = result is None
        with contextlib.ExitStack() as scope:
            if counted:
                rng.rewind()  # after a failed attempt: draw what it would have drawn
            else:
                scope.enter_context(rng.replay())
            snapshot = scope.enter_context(_buffer_snapshot(model))
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                out = ENGINES[name](closure, params, tangents, True, model)
            except (RuntimeError, NotImplementedError) as exc:
                snapshot.restore()
                failures[name] = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, _compiled.CompiledModelError):  # timed next, in this loop
                    names.append(_compiled.EAGER_VARIANT[name])
                continue
            if on_cuda:
                torch.cuda.synchronize()
            timings[name] = time.perf_counter() - start
            if counted:
                result = out
            else:
                snapshot.restore()
    if result is None:
        rng.rewind()
        raise RuntimeError(f"no HVP engine works for this model: {failures}")
    return result, min(timings, key=timings.get), timings, failures
