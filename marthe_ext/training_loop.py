r"""Fitting the training loops people already have: the backward-style step and ``group["lr"]``.

The API (this docstring is the reference for users and for trainer integrations)::

    # 1. closure style (SPEC section 2): the optimizer differentiates the loss itself
    opt.step(lambda: loss_fn(model(x), y))                      # train mode (HD-style h)
    opt.step(lambda: loss_fn(model(x), y), val_closure=val)     # val mode

    # 2. backward style: the usual torch loop
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward(create_graph=True)   # plain loss.backward() is enough when mu == 0
    opt.step()                         # train mode; returns None (torch's convention)
    opt.step(val_closure=val)          # val mode, still one line: E is evaluated inside
                                       # step() at the updated weights w_{t+1}
    opt.step(loss=loss)                # the step sees the loss (safeguard (e)) and returns it
    opt.observe_loss(loss); opt.step() # the same where the loop calls step() bare (a trainer)

    # 3. step sizes and schedulers
    float(opt.param_groups[i]["lr"])   # the step size group i uses: eta * lr_scale * f_i
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=100)
    sched = marthe_ext.follow_eta(torch.optim.lr_scheduler.LambdaLR(opt, lambda t: ...))

**Backward style** (``opt.step()`` with no ``closure``). The gradient is ``p.grad``; the
HVP ``H Zw`` is ``autograd.grad(.grad, params, Zw)`` through the graph that
``backward(create_graph=True)`` kept. The result is bit-identical to the closure path with
``hvp="reverse"`` (same gradient, same double backward). Rules:

* An HVP is needed when mu may be > 0 and the tangent is not new (every step but the
  first, unless mu = 0). Then at least one ``.grad`` must carry a graph, else
  ``RuntimeError("the HVP needs the graph: call loss.backward(create_graph=True) ...")``;
  parameters whose ``.grad`` has no graph get ``H Zw = 0`` there, exactly as the closure
  path does for a gradient that does not depend on the weights (a loss linear in every
  parameter keeps no graph at all: use a closure there). ``hvp`` must be "auto" or
  a reverse-mode engine ("reverse", "reverse-eager"): "forward" and "fd" re-evaluate the
  loss, so they need a closure, or an ``hvp_closure``.
* ``opt.step(hvp_closure=sub_batch_loss)``: the gradient from ``.grad`` (a plain
  ``backward()`` suffices) and the HVP from the closure by the configured engine -- the way
  to combine the usual loop with ``hvp="fd"`` (e.g. a ``torch.compile``d model).
* No ``.grad`` at all: ``RuntimeError`` (call backward first, or pass a closure).
* After the step every parameter that had a ``.grad`` holds the detached gradient (as the
  closure path leaves it): the double-backward graph and the parameter-gradient reference
  cycle that ``backward(create_graph=True)`` creates (torch warns about it) are released
  by ``step()``, so nothing accumulates across steps.
* ``opt.zero_grad()`` between steps as with any torch optimizer. Without it the next
  ``backward`` adds to the previous step's (detached) gradient, torch's usual semantics;
  that stale part is a constant, so it adds nothing to the HVP.
* Edit gradients through ``Marthe(grad_clip=...)`` (applied to g and, consistently, to the
  HVP), not in place on ``.grad`` (``clip_grad_norm_``, a manual unscale): the HVP comes
  from the graph and would not see such edits. float16 loss scaling: ``marthe_ext.amp``.
* Gradient accumulation: several ``backward(create_graph=True)`` calls before one step sum
  their gradients in ``.grad`` and their graphs with them: the step uses the gradient and
  the HVP of the summed loss. Every call that should count in the HVP needs
  ``create_graph=True``; a plain call's part is a constant there (torch cannot tell the
  optimizer which calls kept a graph).
* The validation hypergradient: ``opt.step(val_closure=...)``. MARTHE's h uses
  ``grad E(w_{t+1})`` after the update, so E must be evaluated inside the step; a loss
  computed by the loop before ``step()`` would be at ``w_t``.

**``group["lr"]`` and schedulers.** Each param group carries ``"lr"``, a 0-dim float64
tensor on the parameters' device holding ``eta * lr_scale * f`` (the step size the group
uses), and ``"initial_lr"``, a live tensor holding ``eta * lr_scale`` (the group's step
size without any scheduler). ``step()`` updates both in place, on the device, without a
host sync; ``float(group["lr"])`` reads the value (a sync, outside the step). The rule:

    f_G = group["lr"] / (eta * lr_scale)   as found when step() starts

so whatever writes ``group["lr"]`` between two steps -- a scheduler, or the user -- sets
the group's multiplier ``f_G``, and MARTHE's own changes of eta rescale ``group["lr"]``
without touching it. The step then uses the step size ``eta * lr_scale * f_G`` and the
tangent's ``B`` term its derivative in eta, ``lr_scale * f_G``, so the hypergradient is
the one of the step sizes actually used (``f_G`` is treated as a constant schedule). A
group whose ``eta * lr_scale`` is 0 keeps its previous ``f_G`` (there is nothing to divide).

* torch's schedulers that multiply the current LR (LinearLR, ConstantLR, StepLR,
  MultiStepLR, ExponentialLR, PolynomialLR, MultiplicativeLR, CosineAnnealingLR within
  ``T_max`` with ``eta_min=0``, ReduceLROnPlateau, ChainedScheduler of them) therefore
  multiply the step size on top of eta: ``f`` is the product of their factors.
* Schedulers that compute from the base LRs they copied when built (LambdaLR;
  SequentialLR when it switches to its next scheduler; CosineAnnealingLR's restart past
  ``T_max``; the closed forms) would set the
  step size from eta *at their construction*, freezing MARTHE's adaptation. Wrap them:
  ``follow_eta(scheduler)`` points their base LRs at the live ``eta * lr_scale``, so
  ``base * lambda(t)`` is ``eta * lr_scale * lambda(t)``, i.e. ``f = lambda(t)``. Call it
  again after ``scheduler.load_state_dict(...)`` (a checkpoint stores plain copies).
  ``follow_eta`` changes nothing for the multiplying ones, so wrapping every scheduler is
  the simple rule.
* OneCycleLR and CyclicLR set absolute LRs from their own ``max_lr``: they replace
  MARTHE's schedule (``f`` becomes their value divided by eta * lr_scale).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .hvp import hvp_through_gradients

__all__ = ["backward_gradients", "ObservedLoss", "GroupStepSizes", "follow_eta"]


# ---------------------------------------------------------------------- backward style
def backward_gradients(params: Sequence[Tensor], tangents: Sequence[Tensor], need_hvp: bool,
                       hvp: str):
    """(grads, hvps) from ``p.grad`` and its graph, in the engines' format (``hvp.py``);
    ``hvp`` is the configured engine option (``Marthe(hvp=...)``).

    ``grads`` are detached (None where ``p.grad`` is None); ``hvps`` is None when no HVP
    is needed, else ``H Zw`` per parameter (None where it is exactly zero).
    """
    raw = [p.grad for p in params]
    if all(g is None for g in raw):
        raise RuntimeError(
            "opt.step() without a closure takes the gradient from .grad, but no parameter has "
            "one: call loss.backward() before opt.step() (loss.backward(create_graph=True) when "
            "mu > 0), or pass a closure: opt.step(closure)")
    grads = [None if g is None else g.detach() for g in raw]
    if not need_hvp:
        return grads, None
    if hvp != "auto" and not hvp.startswith("reverse"):
        raise ValueError(
            f"hvp={hvp!r} re-evaluates the loss, which opt.step() without a closure cannot "
            f"do: pass the loss as a closure (opt.step(closure)), or an hvp_closure, or use "
            f"hvp='reverse' (or 'auto') with loss.backward(create_graph=True)")
    hvps = hvp_through_gradients(raw, params, tangents)
    if hvps is None:
        raise RuntimeError(
            "the HVP needs the graph: call loss.backward(create_graph=True) before opt.step() "
            "(no parameter's .grad carries an autograd graph; mu > 0 needs H Zw from it after "
            "the first step), or pass the loss as a closure: opt.step(closure)")
    return grads, hvps


class ObservedLoss:
    """``Marthe.observe_loss(loss)``: the training loss of the coming backward-style step for
    a loop that calls ``step()`` with no arguments (a trainer's), as ``step(loss=...)``
    would give it. Several calls before one step add up (gradient accumulation: the losses
    whose gradients ``.grad`` sums); the step takes the sum and starts a new one. A step
    with a closure or ``loss=`` while a sum is pending is refused: two losses for one step."""

    def __init__(self):
        self.total: Optional[Tensor] = None

    def add(self, loss: Tensor) -> None:
        if not isinstance(loss, Tensor):
            raise TypeError(f"observe_loss takes the loss tensor you call backward on, got "
                            f"{type(loss).__name__}")
        if loss.numel() != 1 or not loss.is_floating_point():
            raise TypeError(f"observe_loss takes a scalar floating-point loss tensor, got "
                            f"{loss.dtype} of shape {tuple(loss.shape)}")
        loss = loss.detach().reshape(())
        self.total = loss if self.total is None else self.total + loss

    def take(self, closure, loss: Optional[Tensor]) -> Optional[Tensor]:
        """The loss this step sees: ``loss`` (step's ``loss=``), or the observed sum."""
        if self.total is None:
            return loss
        if closure is not None or loss is not None:
            raise ValueError("observe_loss() gave this step its loss, and step() got "
                             + ("a closure" if closure is not None else "loss=") + " too: use one of them")
        total, self.total = self.total, None
        return total


# ---------------------------------------------------------------------- group["lr"]
def _as_device_scalar(value: Any, like: Tensor, what: str) -> Tensor:
    """``value`` (a real number or a 1-element tensor) as a float64 0-dim tensor on
    ``like``'s device, without reading a device value on the host."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(dtype=like.dtype, device=like.device)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a real number or a 1-element tensor, got {value!r}")
    return torch.full((), float(value), dtype=like.dtype, device=like.device)


def _set_multiplier_(mult: Tensor, lr: Tensor, base: Tensor, fallback: Tensor) -> None:
    """mult <- lr / base, or ``fallback`` where base is 0 (where() drops the 0-division)."""
    mult.copy_(torch.where(base != 0, lr / base, fallback))


class GroupStepSizes:
    """Publishes ``group["lr"] = eta * lr_scale * f`` and ``group["initial_lr"] = eta *
    lr_scale`` and reads the multipliers ``f`` that schedulers write (the rule above).

    Per group it owns three device scalars, replaced in the group dicts by nobody but
    itself: ``lr`` (published), ``base`` (``eta * lr_scale`` as last published) and
    ``mult`` (``f``). Group ``i`` of ``param_groups`` is entry ``i`` here (groups are only
    ever appended).
    """

    def __init__(self, eta: Tensor):
        self.eta = eta
        self.lr: list[Tensor] = []
        self.base: list[Tensor] = []
        self.mult: list[Tensor] = []

    def attach(self, groups: Sequence[dict]) -> None:
        """Give every group not seen yet its ``lr`` and ``initial_lr`` (f = 1)."""
        for group in groups[len(self.lr):]:
            base = self.eta * float(group["lr_scale"])
            self.base.append(base)
            self.mult.append(torch.ones_like(base))
            self.lr.append(base.clone())
            group["lr"] = self.lr[-1]
            group["initial_lr"] = base

    def scales(self, groups: Sequence[dict]) -> list[Tensor]:
        """At the start of a step: read each group's ``f`` from ``group["lr"]`` and return
        ``lr_scale * f`` per group (``d step size / d eta``, make_coeffs' ``lr_scale``)."""
        self.attach(groups)
        out = []
        for group, base, mult in zip(groups, self.base, self.mult):
            lr = _as_device_scalar(group["lr"], base, 'param_groups[i]["lr"]')
            _set_multiplier_(mult, lr, base, mult)
            out.append(mult * float(group["lr_scale"]))
        return out

    def publish(self, groups: Sequence[dict]) -> None:
        """At the end of a step (and after loading): ``lr`` and ``base`` from the current eta,
        in place; a group whose ``"lr"`` entry was replaced gets the live tensor back."""
        self.attach(groups)
        for group, lr, base, mult in zip(groups, self.lr, self.base, self.mult):
            torch.mul(self.eta, float(group["lr_scale"]), out=base)
            torch.mul(base, mult, out=lr)
            group["lr"] = lr

    # --------------------------------------------------------------- checkpoints
    @staticmethod
    def check_saved_groups(saved_groups: Sequence[dict]) -> None:
        for i, sg in enumerate(saved_groups):
            if "lr" in sg:
                value = sg["lr"]
                ok = (isinstance(value, Tensor) and value.numel() == 1) or (
                    isinstance(value, (int, float)) and not isinstance(value, bool))
                if not ok:
                    raise ValueError(f"param group {i} of the state dict has an 'lr' entry that is "
                                     f"neither a number nor a 1-element tensor: {value!r}")

    @staticmethod
    def saved_groups(groups: Sequence[dict]) -> None:
        """In a state dict being built: copies of the live tensors (the dict is a snapshot)."""
        for group in groups:
            for key in ("lr", "initial_lr"):
                if isinstance(group.get(key), Tensor):
                    group[key] = group[key].detach().clone()

    def load(self, groups: Sequence[dict], saved_groups: Sequence[dict]) -> None:
        """After eta and lr_scale are loaded: f from the saved ``lr`` (1 for checkpoints
        written before groups carried one), then publish."""
        self.attach(groups)
        for group, sg, base, mult in zip(groups, saved_groups, self.base, self.mult):
            torch.mul(self.eta, float(group["lr_scale"]), out=base)
            mult.fill_(1.0)
            if "lr" in sg:
                _set_multiplier_(mult, _as_device_scalar(sg["lr"], base, "the saved lr"), base, mult)
        self.publish(groups)


# ---------------------------------------------------------------------- schedulers
def _leaf_schedulers(scheduler) -> list:
    subs = getattr(scheduler, "_schedulers", None)
    if subs is None:
        return [scheduler]
    return [leaf for s in subs for leaf in _leaf_schedulers(s)]


def follow_eta(scheduler):
    """Make a torch LR scheduler multiply MARTHE's live step size instead of the one it
    copied when built; returns the scheduler (``sched = follow_eta(LambdaLR(opt, f))``).

    Every scheduler inside it (SequentialLR and ChainedScheduler included) gets
    ``base_lrs`` = the optimizer's live ``eta * lr_scale`` tensors, so schedules computed
    from the base (``base * lambda(t)``, closed forms, SequentialLR's switches) give the
    multiplier ``lambda(t)`` on top of eta. Idempotent. Call it again after
    ``scheduler.load_state_dict(...)``: a checkpoint stores plain copies of the base LRs.
    """
    opt = getattr(scheduler, "optimizer", None)
    while not hasattr(opt, "_protocol") and hasattr(opt, "optimizer"):  # accelerate's wrapper
        opt = opt.optimizer
    step_sizes = getattr(getattr(opt, "_protocol", None), "step_sizes", None)
    if not isinstance(step_sizes, GroupStepSizes):
        raise TypeError("follow_eta needs a torch.optim.lr_scheduler scheduler built on a "
                        f"marthe_ext.Marthe optimizer, got {type(scheduler).__name__} on "
                        f"{type(opt).__name__}")
    step_sizes.attach(opt.param_groups)
    for leaf in _leaf_schedulers(scheduler):
        if not hasattr(leaf, "base_lrs"):
            raise TypeError(f"{type(leaf).__name__} has no base_lrs: follow_eta needs torch's "
                            f"LRScheduler family")
        leaf.base_lrs = list(step_sizes.base)
    return scheduler
