"""HVP engines and ``torch.compile``d models.

torch (2.13) cannot differentiate compiled code twice, nor in forward mode:

* double backward through a compiled forward (``hvp="reverse"``) raises "torch.compile with
  aot_autograd does not currently support double backward" or "... compiled with non-empty
  donated buffers ... create_graph=False". Switching donated buffers off
  (``torch._functorch.config.donated_buffer = False``) only turns the second message into
  the first: aot_autograd's backward is not itself differentiable;
* forward-mode AD (``hvp="forward"``, ``hypergrad="jvp"``) raises "You must implement the
  jvp function for custom autograd.Function": the compiled graph is an autograd.Function
  with a backward and no jvp;
* ``torch.func.jvp(torch.func.grad(...))`` over a compiled module runs, but dynamo refuses
  to trace under functorch transforms ("Unsupported functorch tracing attempt") and runs
  the module eagerly; compiling the whole HVP instead fails inside dynamo when the closure
  calls a compiled module.

First-order gradients go through compiled code, so ``hvp="fd"`` (two gradients) keeps the
compiled forward, with the approximation error of a finite difference.

The exact engines are made to work by evaluating the closure eagerly for the step that
takes an HVP: ``torch.compiler.set_stance("force_eager")`` makes every compiled function
run its original Python code for the duration of the call (a process-wide switch, restored
on exit; the compiled graphs stay cached for the rest of the training loop). The result is
bit-identical to the eager model, at eager cost. These are the engines ``"reverse-eager"``
and ``"forward-eager"``; ``hvp="auto"`` falls back to them when the plain exact engines
fail on compiled code, and says so.

An explicit ``hvp="reverse"`` or ``"forward"`` whose call fails on compiled code raises
``CompiledModelError`` naming what to use instead. The failure is recognised from torch's
own error when it happens; nothing is guessed from the model beforehand.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

# Fragments of torch's messages for the two failures above (torch 2.5 - 2.13).
_DOUBLE_BACKWARD = ("does not currently support double backward", "donated buffers")
# The second: inductor's generated code calls out= kernels, which have no forward-mode AD.
_FORWARD_MODE = ("must implement the jvp function", "Trying to use forward AD with")

EAGER_VARIANT = {"reverse": "reverse-eager", "forward": "forward-eager"}


class CompiledModelError(RuntimeError):
    """An HVP engine cannot differentiate through the ``torch.compile``d code the closure runs."""


def compile_failure_kind(exc: BaseException) -> str | None:
    """"double backward" or "forward-mode" when ``exc`` is torch refusing to differentiate
    compiled code that way, else None."""
    text = str(exc)
    if any(s in text for s in _DOUBLE_BACKWARD):
        return "double backward"
    if any(s in text for s in _FORWARD_MODE):
        return "forward-mode"
    return None


def _advice(name: str) -> str:
    return (f"use hvp={EAGER_VARIANT[name]!r} (exact: the HVP step runs the compiled model eagerly, "
            f"at eager cost), hvp='fd' (keeps the compiled forward; a finite-difference "
            f"approximation) or hvp='auto' (picks one of them and says which)")


def explained(name: str, engine: Callable) -> Callable:
    """``engine`` raising CompiledModelError, with what to use instead, where torch refuses to
    differentiate compiled code (the original error is chained as its cause)."""

    @functools.wraps(engine)
    def run(closure, params, tangents, need_hvp, model=None):
        try:
            return engine(closure, params, tangents, need_hvp, model)
        except (RuntimeError, NotImplementedError) as exc:
            kind = compile_failure_kind(exc)
            if kind is None:
                raise
            detail = str(exc).strip().splitlines()[0]
            if kind == "double backward":
                raise CompiledModelError(
                    f"hvp={name!r} needs double backward AD through the closure, which torch cannot do "
                    f"through a torch.compile'd model: {_advice(name)}. torch said: {detail}") from exc
            # The same message comes from an eager op that has no forward-mode derivative.
            raise CompiledModelError(
                f"hvp={name!r} needs forward-mode AD through the closure, which torch cannot do through "
                f"a torch.compile'd model, nor through an op without a forward-mode derivative (e.g. "
                f"F.huber_loss, F.soft_margin_loss, F.multi_margin_loss, a custom autograd.Function "
                f"without jvp). With a compiled model {_advice(name)}; with an eager model use "
                f"hvp='reverse' (exact) or hvp='auto'. torch said: {detail}") from exc

    return run


def explained_jvp_hypergrad(jvp_hypergrad: Callable) -> Callable:
    """``hypergrad="jvp"`` raising CompiledModelError, with what to use instead, where the
    validation closure runs compiled code (forward-mode AD cannot go through it)."""
    @functools.wraps(jvp_hypergrad)
    def run(*args, **kwargs):
        try:
            return jvp_hypergrad(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as exc:
            if compile_failure_kind(exc) != "forward-mode":
                raise
            raise CompiledModelError(
                "hypergrad='jvp' needs forward-mode AD through val_closure, which torch cannot do "
                "through a torch.compile'd model (nor through an op without forward-mode support): "
                "use hypergrad='grad' (the default, exact) or "
                f"hypergrad='fd'. torch said: {str(exc).strip().splitlines()[0]}") from exc
    return run


def eager(engine: Callable) -> Callable:
    """``engine`` with every ``torch.compile``d function run eagerly during the call."""

    @functools.wraps(engine)
    def run(closure, params, tangents, need_hvp, model=None):
        if not need_hvp:  # a first-order gradient goes through compiled code
            return engine(closure, params, tangents, need_hvp, model)
        with torch.compiler.set_stance("force_eager"):
            return engine(closure, params, tangents, need_hvp, model)

    return run


def auto_choice_message(chosen: str, failures: dict[str, str]) -> str:
    """What ``hvp="auto"`` says when an engine it tried failed: the choice and why."""
    why = "; ".join(f"{n!r} failed ({reason.splitlines()[0]})" for n, reason in failures.items())
    if chosen in EAGER_VARIANT.values():
        how = ("exact, but the HVP step runs the closure's torch.compile'd model eagerly; "
               "hvp='fd' keeps the compiled forward (approximate)")
    else:
        how = "the fastest exact engine that works"
    return f"marthe_ext: hvp='auto' uses {chosen!r} ({how}): {why}"
