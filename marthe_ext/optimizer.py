r"""``Marthe``: an optimizer that schedules its own learning rate online.

MARTHE (Donini et al., IJCAI 2020) keeps a tangent :math:`Z` of the training state and
descends the hypergradient of a validation loss :math:`E` with respect to the LR:

.. math::
    Z_{t+1} = \mu A_t Z_t + B_t, \qquad
    h_t = \langle \nabla E(w), Z^w \rangle, \qquad
    \eta \leftarrow \max(\eta - \beta h_t, 0)

with :math:`A_t = \partial\Phi_t/\partial x`, :math:`B_t = \partial\Phi_t/\partial\eta` for
one step :math:`\Phi_t` of SGD, SGD-momentum, Adam or AdamW. :math:`\mu = 0` is
hypergradient descent (HD), :math:`\mu = 1` is RTHO. By default (``safeguards="robust"``)
the LR update is safeguarded (same tangent, hypergradient normalised and stepped in log
eta, beta adapted); ``safeguards=None`` is the update above.

This class is the thin ``torch.optim.Optimizer`` that wires three parts together:
``config.py`` (``MartheConfig``: every option, validated once, frozen), ``controller.py``
(``HyperController``: eta, beta, mu and every rule that changes them) and ``protocol.py``
(``StepProtocol``: gradients and HVPs, the fused update through a backend, the
hypergradient). The per-element maths of every dynamics is in SPEC and in
``backends/torch_ref.py``.

All changing scalars (eta, beta, mu, the step count, the hypergradient) live on the
parameters' device; ``step()`` never waits for the device. Read them with ``opt.lr``,
``opt.mu``, ``opt.hyper_lr``, ``opt.last_hypergrad``, ``opt.skipped_steps``.
"""
from __future__ import annotations

import os
import sys
import warnings
from collections import defaultdict
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .amp import LossScaleOption, LossScaler
from .backends.api import STATE_NAMES
from .config import MartheConfig, check_number
from .controller import HyperController
from .distributed import check_not_sharded, check_process_group
from .hvp import check_model_holds
from .protocol import StepProtocol, state_dtype
from .training_loop import GroupStepSizes, ObservedLoss

_GROUP_KEYS = {"params", "lr_scale", "weight_decay", "name"}


def _caller_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside marthe_ext and torch (step() runs
    under torch's no_grad and optimizer-hook wrappers, whose depth varies by version)."""
    skip = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())


class Marthe(torch.optim.Optimizer):
    r"""Online learning-rate scheduling by hypergradients (MARTHE; HD and RTHO as special cases).

    Args:
        params: parameters or param groups. A group may set ``lr_scale`` (its step is
            ``eta * lr_scale``) and ``weight_decay``; all groups share one eta.
        lr: initial learning rate eta_0 (>= 0).
        dynamics: the inner optimizer, "sgd" | "sgdm" | "adam" | "adamw".
        momentum, nesterov: for "sgdm" (dampening 0, as torch.optim.SGD).
        betas, eps: for "adam"/"adamw" (torch.optim.Adam semantics).
        weight_decay: L2 coupled into the gradient (sgd, sgdm, adam) or decoupled (adamw).
        mu: tangent discount in [0, 1] (0 = HD, 1 = RTHO) or "auto" (the authors' rule;
            needs ``val_closure`` and ``hypergrad="grad"``).
        hyper_lr: beta, the LR's own step size (>= 0). Default: 1e-6 for the raw
            hypergradient, 1e-3 when ``hypergrad_norm`` is set (a step on the normalised h).
        hyper_lr_adapt: alpha >= 0; when > 0, ``beta = max(beta + alpha h eta, 0)`` each step.
        grad_clip: elementwise clip c of the gradient and of the HVP (None: no clipping).
        hvp: Hessian-vector product engine, "reverse" | "forward" | "fd" | "auto" (the
            faster of the exact engines that work for the model -- forward needs ``model``
            -- timed once on the first step that needs an HVP; ``opt.hvp_engine`` and
            ``opt.hvp_timings`` report the choice; with a ``torch.compile``d model it
            falls back to "reverse-eager"/"forward-eager" and warns), "reverse-eager" |
            "forward-eager" (exact engines for compiled models: the HVP step runs the
            compiled code eagerly; see ``marthe_ext.compiled``).
        hypergrad: how ``<grad E, Zw>`` is computed in validation mode, "grad" | "jvp" | "fd".
        backend: "auto" | "torch" | "triton" | "cuda" | "cpu" (or $MARTHE_BACKEND).
        max_lr_change: safeguard (a), rho > 1: eta moves by at most a factor rho per step.
        max_lr_growth: safeguard (a'), rho_up > 1: eta grows by at most a factor rho_up per
            step; decreases are not bounded.
        hypergrad_norm: safeguard (b), None | "rms" | "rms-log": divide h by its running
            RMS (decay ``hypergrad_norm_decay``); "rms-log" steps in log eta (beta is then
            a relative step and eta stays positive).
        max_tangent_ratio: safeguard (c), kappa > 0: keep ``||Zw|| <= kappa ||w||``.
        hyper_lr_rprop: safeguard (d), (shrink, grow) with 0 < shrink <= 1 <= grow, e.g.
            (0.5, 1.2): beta is multiplied by grow when h agrees in sign with its recent
            average and by shrink when it disagrees, kept in ``hyper_lr_bounds`` (whose
            defaults suit "rms-log", where beta is a relative step). Needs
            ``hypergrad_norm``; ``hyper_lr`` is then only the first meta step.
        safeguards: a preset, "robust" (the default) | None. "robust" sets ``hypergrad_norm="rms-log"``,
            ``max_lr_growth=1.1``, ``hyper_lr_rprop=(0.5, 1.2)``, ``loss_trust=0.5``,
            ``decay_trend=2.0`` unless given (the safeguard study's and issue 15's study's
            recommendation). None with no
            safeguard option is the faithful algorithm of SPEC section 2.
            See ``marthe_ext.controller`` for the maths of each.
        model: the ``nn.Module`` whose parameters are optimized. Needed by ``hvp="forward"``
            and ``hypergrad="jvp"`` (they place dual parameters in it) and used by
            ``hvp="fd"`` to restore module buffers after its probe evaluation.
        process_group: data parallelism (``marthe_ext.distributed``). None (the default):
            when ``torch.distributed`` is initialised with a world size above 1, average the
            gradient, HVP, validation hypergradient and loss over the default group, so
            every rank takes the step one process would take on the global batch; a
            ``ProcessGroup``: average over it; ``False``: no syncing (independent replicas).
        loss_scale: dynamic loss scaling for float16 autocast in the closures (``marthe_ext.amp``):
            None (the default), "dynamic" (GradScaler's defaults) or a
            ``marthe_ext.DynamicLossScale``. ``opt.loss_scale`` reads the current scale.
        first_order: cheaper steps, an approximation (README "Cheaper steps"): the tangent
            recursion with the Hessian term dropped, ``A_t`` with ``H_t = 0`` (the training
            gradient, coupled L2 included, taken as a constant of w): no HVP at all.
        hvp_every: k >= 1, an approximation for k > 1: the exact HVP only on steps
            t = 0 mod k (t counts ``step()`` calls from 0, checkpointed), ``H_t = 0`` on the
            others. 1 (the default) is the exact algorithm.
        hypergrad_every: k >= 1, an approximation for k > 1: the hypergradient (and in val
            mode the validation pass) and the LR update (with its safeguards and auto-mu)
            only on steps t = 0 mod k; the tangent still moves every step.
        compile_lr_update: run the LR update (every safeguard) as one ``torch.compile``d
            function, one kernel instead of ~57 small ops (``marthe_ext.fused_lr``); the
            same maths, equal to float64 rounding. The first step compiles (seconds).
        loss_trust: tau > 0, safeguard (e): while the running training loss is above its
            best so far by more than tau |best|, the LR may not exceed the LR it had at that
            best, and (d)'s beta shrinks. It sees the closure's loss; in backward style pass
            ``opt.step(loss=loss)``, else it is inactive.
        decay_trend: z > 0, safeguard (f), with ``hyper_lr_rprop``: decreases of the LR get
            their own meta step, which takes (d)'s factors and also grows while the ~20-step
            mean of the normalised h asks for a smaller LR with a z-score above z (a decay
            trend too noisy for (d)'s one-step sign test). Increases keep (d)'s beta.
        decay_trend_test: (f)'s statistic, "mean" (None: the preset's, else "mean") or
            "sign": the ~20-step mean of sign(h) instead, the share of steps asking for a
            smaller LR, which a few large h asking for more do not outweigh: better on
            BatchNorm CNNs at mu >= 0.99, worse with HD and mu = 0.9 (README, "The
            default's study"). Needs ``decay_trend``.

    ``step(closure, val_closure=None)``: ``closure()`` returns the training loss and does
    NOT call backward (the optimizer differentiates it). Without ``val_closure`` the
    hypergradient comes from the training loss before the update (HD style, no extra
    pass); with it, from the validation loss after the update. ``step()`` without a closure
    is the usual torch loop (``loss.backward(create_graph=True); opt.step()``) and
    ``param_groups[i]["lr"]`` is the group's step size, which torch's LR schedulers scale:
    see ``marthe_ext.training_loop``.
    """

    def __init__(
        self,
        params,
        lr: float = 0.01,
        dynamics: str = "sgd",
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mu: Union[float, str] = 0.99,
        hyper_lr: Optional[float] = None,
        hyper_lr_adapt: float = 0.0,
        grad_clip: Optional[float] = None,
        hvp: str = "reverse",
        hypergrad: str = "grad",
        backend: str = "auto",
        model: Optional[torch.nn.Module] = None,
        max_lr_change: Optional[float] = None,
        max_lr_growth: Optional[float] = None,
        hypergrad_norm: Optional[str] = None,
        hypergrad_norm_decay: float = 0.99,
        max_tangent_ratio: Optional[float] = None,
        hyper_lr_rprop: Optional[tuple[float, float]] = None,
        hyper_lr_bounds: tuple[float, float] = (1e-6, 0.1),
        safeguards: Optional[str] = "robust",
        process_group=None,
        loss_scale: LossScaleOption = None,
        first_order: bool = False,
        hvp_every: int = 1,
        hypergrad_every: int = 1,
        compile_lr_update: bool = False,
        loss_trust: Optional[float] = None,
        decay_trend: Optional[float] = None,
        decay_trend_test: Optional[str] = None,
    ):
        check_process_group(process_group)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.config = MartheConfig.from_arguments(
            lr=lr, dynamics=dynamics, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
            weight_decay=weight_decay, mu=mu, hyper_lr=hyper_lr, hyper_lr_adapt=hyper_lr_adapt,
            grad_clip=grad_clip, hvp=hvp, hypergrad=hypergrad, backend=backend,
            max_lr_change=max_lr_change, max_lr_growth=max_lr_growth, hypergrad_norm=hypergrad_norm,
            hypergrad_norm_decay=hypergrad_norm_decay, max_tangent_ratio=max_tangent_ratio,
            hyper_lr_rprop=hyper_lr_rprop, hyper_lr_bounds=hyper_lr_bounds, safeguards=safeguards,
            has_model=model is not None, first_order=first_order, hvp_every=hvp_every,
            hypergrad_every=hypergrad_every, compile_lr_update=compile_lr_update,
            loss_trust=loss_trust, decay_trend=decay_trend, decay_trend_test=decay_trend_test)
        self.model = model
        super().__init__(params, dict(lr_scale=1.0, weight_decay=self.config.weight_decay))
        if model is not None:
            check_model_holds(model, [p for g in self.param_groups for p in g["params"]])
        device = self.param_groups[0]["params"][0].device
        self._controller = HyperController(self.config, device)
        self._protocol = StepProtocol(self.config, self._controller, model, device, _warn,
                                      process_group=process_group)
        self._protocol.step_sizes.attach(self.param_groups)  # group["lr"], group["initial_lr"]
        self._protocol.scaler = LossScaler.from_option(loss_scale, device)
        self._skip_warned = False
        self._observed_loss = ObservedLoss()

    # The configuration, read-only (``opt.config`` holds all of it).
    dynamics = property(lambda self: self.config.dynamics)
    grad_clip = property(lambda self: self.config.grad_clip)
    safeguards = property(lambda self: self.config.safeguards)
    hvp = property(lambda self: self.config.hvp)
    hypergrad = property(lambda self: self.config.hypergrad)
    backend_request = property(lambda self: self.config.backend)
    mu_auto = property(lambda self: self.config.mu_auto)
    hyper_lr_init = property(lambda self: self.config.hyper_lr)
    hyper_lr_adapt = property(lambda self: self.config.hyper_lr_adapt)
    max_lr_change = property(lambda self: self.config.max_lr_change)
    max_lr_growth = property(lambda self: self.config.max_lr_growth)
    hypergrad_norm = property(lambda self: self.config.hypergrad_norm)
    hypergrad_norm_decay = property(lambda self: self.config.hypergrad_norm_decay)
    max_tangent_ratio = property(lambda self: self.config.max_tangent_ratio)
    hyper_lr_rprop = property(lambda self: self.config.hyper_lr_rprop)
    hyper_lr_bounds = property(lambda self: self.config.hyper_lr_bounds)
    loss_trust = property(lambda self: self.config.loss_trust)
    decay_trend = property(lambda self: self.config.decay_trend)
    decay_trend_test = property(lambda self: self.config.decay_trend_test)
    first_order = property(lambda self: self.config.first_order)
    hvp_every = property(lambda self: self.config.hvp_every)
    hypergrad_every = property(lambda self: self.config.hypergrad_every)

    # ----------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict) -> None:
        """Validate the whole group (keys, tensors, values, device), then add it: a rejected
        group leaves the optimizer as it was."""
        extra = set(param_group) - _GROUP_KEYS
        if extra:
            raise ValueError(
                f"param groups may set only lr_scale and weight_decay (all groups share one eta "
                f"and one dynamics); got {sorted(extra)}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__} at index {i}")
            if p.is_complex():
                raise TypeError("Marthe does not support complex parameters "
                                "(view them as real with torch.view_as_real)")
            if not p.is_floating_point():
                raise TypeError(f"parameters must be floating point, got {p.dtype}")
        check_not_sharded(params)
        group = dict(param_group, params=params)
        for key in ("lr_scale", "weight_decay"):
            if key in group:
                check_number(key, group[key], 0.0)
        devices = {p.device for g in self.param_groups for p in g["params"]} | {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        super().add_param_group(group)
        if hasattr(self, "_protocol"):  # groups added after construction get "lr" now
            self._protocol.step_sizes.attach(self.param_groups)

    # ----------------------------------------------------------------- readers
    @property
    def lr(self) -> float:
        """eta: the LR the next step uses (val mode) or this step used (train mode)."""
        self._warn_if_skipped()
        return float(self._controller.scalars["eta"])

    @property
    def mu(self) -> float:
        return float(self._controller.mu_for_tangent())

    @property
    def hyper_lr(self) -> float:
        return float(self._controller.scalars["beta"])

    @property
    def last_hypergrad(self) -> float:
        return float(self._controller.scalars["last_hypergrad"])

    @property
    def last_hypergrad_error(self) -> Optional[float]:
        """hypergrad="fd" only: a bound on the last estimate's rounding error (else None)."""
        err = self._protocol.fd_error
        return None if err is None else float(err)

    @property
    def skipped_steps(self) -> int:
        self._warn_if_skipped()
        return int(self._controller.scalars["skipped"])

    @property
    def backend(self) -> str:
        """Name of the backend doing the fused update (resolved on the first step)."""
        return self._protocol.backend.name

    @property
    def hvp_engine(self) -> Optional[str]:
        """The HVP engine in use (with hvp="auto": None until the first step that needs one)."""
        return self._protocol.hvp_engine

    @property
    def hvp_timings(self) -> dict[str, float]:
        """hvp="auto": seconds each exact engine took on the step that chose one."""
        return self._protocol.hvp_timings

    @property
    def loss_scale(self) -> Optional[float]:
        """The current loss scale S with ``loss_scale`` set, else None."""
        scaler = self._protocol.scaler
        return None if scaler is None else float(scaler.scale)

    def scale_loss(self, loss: Tensor) -> Tensor:
        """Backward style with ``loss_scale``: ``opt.scale_loss(loss).backward(...)`` (the step
        divides the gradient and HVP by the same S). Without ``loss_scale``: ``loss``."""
        scaler = self._protocol.scaler
        return loss if scaler is None else scaler.scale_loss(loss)

    def hyper_state(self) -> dict[str, Tensor]:
        """The device scalars (eta, beta, mu, ...) without copying or synchronising."""
        return dict(self._controller.scalars)

    def _warn_if_skipped(self) -> None:
        if not self._skip_warned and int(self._controller.scalars["skipped"]) > 0:
            self._skip_warned = True
            _warn("marthe_ext: a step was skipped: a non-finite loss, gradient, HVP or train-mode "
                  "hypergradient leaves weights, state, tangents and eta unchanged; a non-finite "
                  "validation hypergradient (computed after the update) skips only that LR update. "
                  "See opt.skipped_steps")

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    # Always eager, also inside torch.compile'd code (dynamo graph-breaks here): measured with
    # torch 2.13, compiled code silently drops the in-place writes to the 0-dim device scalars
    # (eta, the step count stayed at their start values). The update path itself is compile-
    # safe through marthe_ext.ops; a compiled model is the way to speed up the closures.
    @torch.compiler.disable
    def step(self, closure: Optional[Callable[[], Tensor]] = None,
             val_closure: Optional[Callable[[], Tensor]] = None, *,
             hvp_closure: Optional[Callable[[], Tensor]] = None,
             loss: Optional[Tensor] = None) -> Optional[Tensor]:
        """One MARTHE step; returns the training loss (detached), or None without a closure.

        Without ``closure`` (backward style, see ``marthe_ext.training_loop``): the gradient
        is ``.grad`` after ``loss.backward()``, the HVP comes from the graph kept by
        ``loss.backward(create_graph=True)`` (needed when mu > 0, after the first step), and
        ``opt.step(val_closure=...)`` gives the validation hypergradient. ``loss=`` (the
        loss you called backward on, optional) lets the step see it as a closure's loss:
        checked for finiteness, averaged over data-parallel ranks, used by safeguard (e)
        ``loss_trust`` (the default's), and returned.

        ``hvp_closure`` (optional, an approximation): a loss on a sub-batch of this step's
        batch; the HVP is then taken on it instead of the full batch (H estimated on fewer
        samples, cheaper), while the gradient still comes from ``closure``. Module buffers
        (BatchNorm statistics) changed by it are restored, so they move once per step.
        """
        loss = self._protocol.step(self.param_groups, self.state, closure, val_closure, hvp_closure,
                                   backward_loss=self._observed_loss.take(closure, loss))
        if self._protocol.device.type == "cpu":  # reading a CPU flag costs no device sync
            self._warn_if_skipped()
        return loss

    def observe_loss(self, loss: Tensor) -> None:
        """The training loss of the coming ``step()`` for loops that call it with no
        arguments (a trainer's): the step then sees it as ``step(loss=...)`` -- checked for
        finiteness, averaged over data-parallel ranks, used by safeguard (e) ``loss_trust``
        -- and returns it. Call it with the loss you call backward on; several calls before
        one step (gradient accumulation) add up. ``MartheTrainer`` calls it for you."""
        self._observed_loss.add(loss)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["marthe"] = {
            "dynamics": self.config.dynamics,
            "mu_auto": self.config.mu_auto,
            "steps_called": self._protocol.steps_called,
            "hvp_engine": self._protocol.hvp_engine,
            **self._controller.state_dict(),
        }
        if self._protocol.scaler is not None:
            sd["marthe"]["loss_scale"] = self._protocol.scaler.state_dict()
        GroupStepSizes.saved_groups(sd["param_groups"])
        return sd

    def _check_state_dict(self, state_dict: dict) -> None:
        """Every check of ``load_state_dict``, before anything changes."""
        if not isinstance(state_dict, dict) or "marthe" not in state_dict:
            raise ValueError("not a Marthe state dict (no 'marthe' entry): was it saved by "
                             "marthe_ext.Marthe.state_dict()?")
        meta = state_dict["marthe"]
        if not isinstance(meta, dict):
            raise ValueError(f"the state dict's 'marthe' entry must be a dict, got {type(meta).__name__}")
        if meta.get("dynamics") != self.config.dynamics:
            raise ValueError(f"state dict is for dynamics={meta.get('dynamics')!r}, "
                             f"this optimizer has dynamics={self.config.dynamics!r}")
        if bool(meta.get("mu_auto")) != self.config.mu_auto:
            raise ValueError("state dict and optimizer disagree on mu='auto'")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state dict lacks {key!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} parameter groups, "
                             f"this optimizer has {len(self.param_groups)}")
        id_to_param = {}
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"parameter group {gi} has {len(sg['params'])} parameters in the "
                                 f"state dict and {len(g['params'])} here")
            id_to_param.update(zip(sg["params"], g["params"]))
        expected = {"tangent"} | {n for s in STATE_NAMES[self.config.dynamics] for n in (s, "tangent_" + s)}
        for key, st in state_dict["state"].items():
            if key not in id_to_param:
                raise ValueError(f"state dict has state for unknown parameter {key}")
            p = id_to_param[key]
            if set(st) != expected:
                raise ValueError(f"state of parameter {key} has entries {sorted(st)}, "
                                 f"expected {sorted(expected)}")
            for name, t in st.items():
                if not isinstance(t, Tensor) or tuple(t.shape) != tuple(p.shape):
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"state '{name}' of parameter {key} has shape {shape}, "
                                     f"the parameter has shape {tuple(p.shape)}")
        GroupStepSizes.check_saved_groups(saved_groups)
        if "steps_called" not in meta:
            raise ValueError("state dict lacks the entry 'steps_called'")
        HyperController.check_state_dict(meta)
        if "loss_scale" in meta:
            LossScaler.check_state_dict(meta["loss_scale"])

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a Marthe checkpoint; every check runs before anything is changed.

        torch's registered ``load_state_dict`` pre- and post-hooks run as for any optimizer
        (a pre-hook may return a replacement state dict, which is then the one checked)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_state_dict(state_dict)

        # All checks passed: now change things.
        meta = state_dict["marthe"]
        id_to_param = {k: p for sg, g in zip(state_dict["param_groups"], self.param_groups)
                       for k, p in zip(sg["params"], g["params"])}
        self.state = defaultdict(dict)
        for key, st in state_dict["state"].items():
            p = id_to_param[key]
            self.state[p] = {name: t.detach().to(device=p.device, dtype=state_dtype(p)).clone()
                             for name, t in st.items()}
        for sg, g in zip(state_dict["param_groups"], self.param_groups):
            for k in ("lr_scale", "weight_decay"):
                if k in sg:
                    g[k] = sg[k]
        self._controller.load_state_dict(meta)
        # A checkpoint without loss scaling leaves S at its initial value (scaling newly on);
        # one with it, loaded without, is fine too (scaling switched off).
        if self._protocol.scaler is not None and "loss_scale" in meta:
            self._protocol.scaler.load_state_dict(meta["loss_scale"])
        self._protocol.step_sizes.load(self.param_groups, state_dict["param_groups"])
        self._protocol.steps_called = int(meta["steps_called"])
        if self.config.hvp == "auto":
            self._protocol.hvp_engine = meta.get("hvp_engine")
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


class HD(Marthe):
    """Hypergradient descent (Baydin et al., 2018): ``Marthe`` with mu = 0 (no HVP).

    Baydin et al.'s update exactly with ``safeguards=None``; safeguarded by default."""

    def __init__(self, params, lr: float = 0.01, **kwargs):
        if "mu" in kwargs:
            raise TypeError("HD fixes mu = 0; use Marthe(mu=...) for another value")
        super().__init__(params, lr=lr, mu=0.0, **kwargs)


class RTHO(Marthe):
    """Real-time hyperparameter optimisation (Franceschi et al., 2017): ``Marthe`` with mu = 1.

    The published update exactly with ``safeguards=None``; safeguarded by default."""

    def __init__(self, params, lr: float = 0.01, **kwargs):
        if "mu" in kwargs:
            raise TypeError("RTHO fixes mu = 1; use Marthe(mu=...) for another value")
        super().__init__(params, lr=lr, mu=1.0, **kwargs)
