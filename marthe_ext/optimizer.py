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
the LR update is the safeguarded one of ``safeguards.py`` (same tangent, hypergradient
normalised and stepped in log eta, beta adapted); ``safeguards=None`` is the update above.
The maths of every dynamics is in ``docs``/SPEC and in ``backends/torch_ref.py``; this
class only validates, keeps state, runs the closure protocol and hands lists of tensors
to a backend.

All changing scalars (eta, beta, mu, the step count, the hypergradient) live on the
parameters' device; ``step()`` never waits for the device. Read them with ``opt.lr``,
``opt.mu``, ``opt.hyper_lr``, ``opt.last_hypergrad``, ``opt.skipped_steps``.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from . import _profiling
from . import safeguards as _safeguards
from .backends import BACKENDS, select_backend
from .backends.api import DYNAMICS, STATE_NAMES, GroupBuffers, GroupOptions, make_coeffs
from .hvp import ENGINES, HVP_ENGINES, check_model_holds, module_buffers, time_engines
from .hypergrad import HYPERGRAD_MODES, fd_hypergrad, jvp_hypergrad, validation_gradient

_GROUP_KEYS = {"params", "lr_scale", "weight_decay", "name"}
_HYPER_KEYS = ("eta", "beta", "mu", "mu_counter", "step", "skipped", "last_hypergrad",
               "h_sq_avg", "h_count")
# Added after the first checkpoints were written: absent from a state dict means its start value.
_HYPER_KEYS_SINCE_V1 = ("h_trend",)


def _number(name: str, value: Any, low: float = -math.inf, high: float = math.inf,
            low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if (math.isnan(value) or value < low or value > high
            or (low_open and value == low) or (high_open and value == high)):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")
    return value


def _choice(name: str, value: Any, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _caller_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside marthe_ext and torch (step() runs
    under torch's no_grad and optimizer-hook wrappers, whose depth varies by version)."""
    import os
    import sys

    skip = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _state_dtype(p: Tensor) -> torch.dtype:
    """Optimizer state and tangents: float32 for low-precision params, else the param dtype."""
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


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
            ``opt.hvp_timings`` report the choice).
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
            ``max_lr_growth=1.1``, ``hyper_lr_rprop=(0.5, 1.2)`` unless given (the safeguard
            study's recommendation). None with no safeguard option is the faithful algorithm
            of SPEC section 2.
            See ``marthe_ext.safeguards`` for the maths of each.
        model: the ``nn.Module`` whose parameters are optimized. Needed by ``hvp="forward"``
            and ``hypergrad="jvp"`` (they place dual parameters in it) and used by
            ``hvp="fd"`` to restore module buffers after its probe evaluation.

    ``step(closure, val_closure=None)``: ``closure()`` returns the training loss and does
    NOT call backward (the optimizer differentiates it). Without ``val_closure`` the
    hypergradient comes from the training loss before the update (HD style, no extra
    pass); with it, from the validation loss after the update.
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
    ):
        if safeguards is not None and safeguards not in _safeguards.PRESETS:
            raise ValueError(f"safeguards must be None or one of {tuple(_safeguards.PRESETS)}, "
                             f"got {safeguards!r}")
        self.safeguards = safeguards
        preset = _safeguards.PRESETS.get(safeguards, {})
        rprop_from_preset = hyper_lr_rprop is None and preset.get("hyper_lr_rprop") is not None
        hypergrad_norm = preset.get("hypergrad_norm") if hypergrad_norm is None else hypergrad_norm
        max_lr_growth = preset.get("max_lr_growth") if max_lr_growth is None else max_lr_growth
        hyper_lr_rprop = preset.get("hyper_lr_rprop") if hyper_lr_rprop is None else hyper_lr_rprop
        if hyper_lr is None:
            hyper_lr = _safeguards.DEFAULT_HYPER_LR["raw" if hypergrad_norm is None else "normalised"]
        lr = _number("lr", lr, 0.0)
        self.dynamics = _choice("dynamics", dynamics, DYNAMICS)
        momentum = _number("momentum", momentum, 0.0, 1.0, high_open=True)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
        if nesterov and (dynamics != "sgdm" or momentum == 0):
            raise ValueError("nesterov=True needs dynamics='sgdm' and momentum > 0")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        beta1 = _number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        beta2 = _number("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        eps = _number("eps", eps, 0.0, low_open=True)
        weight_decay = _number("weight_decay", weight_decay, 0.0)
        if isinstance(mu, str):
            if mu != "auto":
                raise ValueError(f"mu must be a number in [0, 1] or 'auto', got {mu!r}")
        else:
            mu = _number("mu", mu, 0.0, 1.0)
        self.hyper_lr_init = _number("hyper_lr", hyper_lr, 0.0)
        self.hyper_lr_adapt = _number("hyper_lr_adapt", hyper_lr_adapt, 0.0)
        if self.hyper_lr_adapt and rprop_from_preset:
            raise ValueError(f"hyper_lr_adapt (the paper's additive beta adaptation) conflicts with "
                             f"safeguards={safeguards!r}, which adapts beta itself: pass safeguards=None")
        if grad_clip is not None:
            grad_clip = _number("grad_clip", grad_clip, 0.0, low_open=True)
        self.hvp = _choice("hvp", hvp, HVP_ENGINES)
        self.hypergrad = _choice("hypergrad", hypergrad, HYPERGRAD_MODES)
        self.backend_request = _choice("backend", backend, BACKENDS)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if model is None and (hvp == "forward" or hypergrad == "jvp"):
            raise ValueError(
                f"hvp={hvp!r}, hypergrad={hypergrad!r} need the model: pass model=my_module")
        if mu == "auto" and hypergrad != "grad":
            raise ValueError("mu='auto' needs hypergrad='grad' (it uses the validation gradient)")

        self.max_lr_change = None if max_lr_change is None else _number(
            "max_lr_change", max_lr_change, 1.0, low_open=True)
        self.max_lr_growth = None if max_lr_growth is None else _number(
            "max_lr_growth", max_lr_growth, 1.0, low_open=True)
        if hypergrad_norm not in _safeguards.HYPERGRAD_NORMS:
            raise ValueError(f"hypergrad_norm must be one of {_safeguards.HYPERGRAD_NORMS}, "
                             f"got {hypergrad_norm!r}")
        self.hypergrad_norm = hypergrad_norm
        if hypergrad_norm == "rms-log" and lr == 0:
            raise ValueError("lr must be > 0 with hypergrad_norm='rms-log' (the default safeguards): the LR "
                             "moves in log space, so 0 would stay 0; pass safeguards=None for the paper's "
                             "update from lr=0")
        self.hypergrad_norm_decay = _number("hypergrad_norm_decay", hypergrad_norm_decay, 0.0, 1.0,
                                            high_open=True)
        self.max_tangent_ratio = None if max_tangent_ratio is None else _number(
            "max_tangent_ratio", max_tangent_ratio, 0.0, low_open=True)
        self.hyper_lr_rprop = None
        if hyper_lr_rprop is not None:
            if not (isinstance(hyper_lr_rprop, (tuple, list)) and len(hyper_lr_rprop) == 2):
                raise TypeError(f"hyper_lr_rprop must be a pair (shrink, grow), got {hyper_lr_rprop!r}")
            shrink = _number("hyper_lr_rprop[0] (shrink)", hyper_lr_rprop[0], 0.0, 1.0, low_open=True)
            grow = _number("hyper_lr_rprop[1] (grow)", hyper_lr_rprop[1], 1.0)
            if hypergrad_norm is None:
                raise ValueError("hyper_lr_rprop adapts a scale-free beta: set hypergrad_norm='rms-log' "
                                 "(or 'rms') with it")
            if self.hyper_lr_adapt:
                raise ValueError("hyper_lr_rprop and hyper_lr_adapt both adapt beta: choose one")
            if not (isinstance(hyper_lr_bounds, (tuple, list)) and len(hyper_lr_bounds) == 2):
                raise TypeError(f"hyper_lr_bounds must be a pair (min, max), got {hyper_lr_bounds!r}")
            low = _number("hyper_lr_bounds[0]", hyper_lr_bounds[0], 0.0, low_open=True)
            high = _number("hyper_lr_bounds[1]", hyper_lr_bounds[1], low)
            if self.hyper_lr_init != 0 and not low <= self.hyper_lr_init <= high:
                raise ValueError(f"hyper_lr={self.hyper_lr_init} must be 0 (LR fixed) or lie in "
                                 f"hyper_lr_bounds [{low}, {high}] when hyper_lr_rprop is set")
            self.hyper_lr_rprop = (shrink, grow)
            self.hyper_lr_bounds = (low, high)
        self.mu_auto = mu == "auto"
        self._mu_fixed = None if self.mu_auto else mu  # host copy: deciding on the HVP needs no sync
        self.model = model
        self.grad_clip = grad_clip
        self._opts_base = dict(dynamics=dynamics, grad_clip=grad_clip, momentum=momentum,
                               nesterov=nesterov, beta1=beta1, beta2=beta2, eps=eps)
        super().__init__(params, dict(lr_scale=1.0, weight_decay=weight_decay))

        if model is not None:
            check_model_holds(model, [p for g in self.param_groups for p in g["params"]])
        device = self.param_groups[0]["params"][0].device
        f64 = dict(dtype=torch.float64, device=device)
        self._hyper: dict[str, Tensor] = {
            "eta": torch.tensor(lr, **f64),
            "beta": torch.tensor(self.hyper_lr_init, **f64),
            # auto: -1 marks "no update yet" (the authors' sentinel); the tangent uses max(mu, 0).
            "mu": torch.tensor(-1.0 if self.mu_auto else mu, **f64),
            "mu_counter": torch.zeros((), **f64),
            "step": torch.zeros((), **f64),
            "skipped": torch.zeros((), dtype=torch.int64, device=device),
            "last_hypergrad": torch.zeros((), **f64),
            "h_sq_avg": torch.zeros((), **f64),  # safeguard (b): running mean of h^2
            "h_count": torch.zeros((), **f64),
            "h_trend": torch.zeros((), **f64),  # safeguard (d): running average of h
        }
        self._steps_called = 0
        self._backend = None
        self.hvp_engine: Optional[str] = None if hvp == "auto" else hvp
        self._skip_warned = False
        self._fd_error: Optional[Tensor] = None
        self.hvp_timings: dict[str, float] = {}  # hvp="auto": seconds per engine, first step

    # ----------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict) -> None:
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
        group = dict(param_group, params=params)
        for key in ("lr_scale", "weight_decay"):
            if key in group:
                _number(key, group[key], 0.0)
        super().add_param_group(group)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")

    def _options(self, group: dict) -> GroupOptions:
        return GroupOptions(weight_decay=float(group["weight_decay"]), **self._opts_base)

    # ----------------------------------------------------------------- readers
    @property
    def lr(self) -> float:
        """eta: the LR the next step uses (val mode) or this step used (train mode)."""
        self._warn_if_skipped()
        return float(self._hyper["eta"])

    @property
    def mu(self) -> float:
        return float(torch.clamp(self._hyper["mu"], 0.0, 1.0))

    @property
    def hyper_lr(self) -> float:
        return float(self._hyper["beta"])

    @property
    def last_hypergrad(self) -> float:
        return float(self._hyper["last_hypergrad"])

    @property
    def last_hypergrad_error(self) -> Optional[float]:
        """hypergrad="fd" only: a bound on the last estimate's rounding error (else None)."""
        return None if self._fd_error is None else float(self._fd_error)

    @property
    def skipped_steps(self) -> int:
        self._warn_if_skipped()
        return int(self._hyper["skipped"])

    @property
    def backend(self) -> str:
        """Name of the backend doing the fused update (resolved on the first step)."""
        return self._resolve_backend().name

    def hyper_state(self) -> dict[str, Tensor]:
        """The device scalars (eta, beta, mu, ...) without copying or synchronising."""
        return dict(self._hyper)

    def _warn_if_skipped(self) -> None:
        if not self._skip_warned and int(self._hyper["skipped"]) > 0:
            self._skip_warned = True
            warnings.warn(
                "marthe_ext: a step had a non-finite loss, gradient, HVP or hypergradient and "
                "was skipped (weights, state, tangents and eta unchanged); see opt.skipped_steps",
                RuntimeWarning, stacklevel=_caller_stacklevel())

    # ----------------------------------------------------------------- state
    def _resolve_backend(self):
        if self._backend is None:
            device = self.param_groups[0]["params"][0].device
            self._backend = select_backend(self.backend_request, device)
        return self._backend

    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        if "tangent" not in state:
            sdt = _state_dtype(p)
            state["tangent"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.contiguous_format)
            for name in STATE_NAMES[self.dynamics]:
                state[name] = torch.zeros_like(state["tangent"])
                state["tangent_" + name] = torch.zeros_like(state["tangent"])
        return state

    def _trainable(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] = None,
             val_closure: Optional[Callable[[], Tensor]] = None, *,
             hvp_closure: Optional[Callable[[], Tensor]] = None) -> Tensor:
        """One MARTHE step; returns the training loss (detached).

        ``hvp_closure`` (optional, an approximation): a loss on a sub-batch of this step's
        batch; the HVP is then taken on it instead of the full batch (H estimated on fewer
        samples, cheaper), while the gradient still comes from ``closure``. Module buffers
        (BatchNorm statistics) are restored after it when ``model`` was given.
        """
        if closure is None or not callable(closure):
            raise TypeError("Marthe.step needs closure: a callable returning the training loss "
                            "(it must not call backward)")
        if val_closure is not None and not callable(val_closure):
            raise TypeError("val_closure must be a callable returning the validation loss")
        if self.mu_auto and val_closure is None:
            raise ValueError("mu='auto' needs val_closure (it uses the validation gradient)")
        backend = self._resolve_backend()
        hp = self._hyper
        params = self._trainable()
        if not params:
            raise ValueError("no parameter requires grad: nothing to optimize")
        states = [self._init_state(p) for p in params]
        tangents = [s["tangent"] for s in states]
        need_hvp = (self.mu_auto or self._mu_fixed != 0.0) and self._steps_called > 0

        if hvp_closure is not None and not callable(hvp_closure):
            raise TypeError("hvp_closure must be a callable returning a sub-batch training loss")
        if hvp_closure is None or not need_hvp:
            loss, grads, hvps = self._gradients(closure, params, tangents, need_hvp)
        else:
            loss, grads, _ = self._gradients(closure, params, tangents, False)
            buffers = module_buffers(self.model)
            saved = [b.clone() for b in buffers]
            _, _, hvps = self._gradients(hvp_closure, params, tangents, True)
            for b, s in zip(buffers, saved):
                b.copy_(s)
        for i, g in enumerate(grads):
            if g is not None and g.is_sparse:
                raise ValueError(f"Marthe does not support sparse gradients (parameter {i}); "
                                 f"use dense gradients, e.g. nn.Embedding(sparse=False)")
        # The fused kernels index tensors flat: conv HVPs (and some grads) come back
        # with permuted strides. contiguous() is free for the usual contiguous case.
        grads = [None if g is None else g.contiguous() for g in grads]
        if hvps is not None:
            hvps = [None if h is None else h.contiguous() for h in hvps]

        used = [i for i, g in enumerate(grads) if g is not None]
        checked = [grads[i] for i in used]
        if hvps is not None:
            checked += [hvps[i] for i in used if hvps[i] is not None]
        ok = torch.isfinite(loss)
        if checked:
            ok = ok & backend.all_finite([checked])

        by_id = {id(p): i for i, p in enumerate(params)}
        parts = self._partitions(params, states, grads, hvps, by_id)

        train_mode = val_closure is None
        if train_mode:
            with _profiling.phase("hypergradient"):
                h = self._sum(backend.clipped_dot(
                    b.grads, b.tangents, clip=self.grad_clip, a_extra=b.params,
                    a_extra_scale=o.coupled_weight_decay) for o, _, b in parts)
                ok = ok & torch.isfinite(h)
                self._lr_update(h, ok)

        with _profiling.phase("fused_update"):
            step_k = hp["step"] + ok.to(torch.float64)
            mu_eff = torch.clamp(hp["mu"], 0.0, 1.0)
            for opts, scale, bufs in parts:
                coeffs = make_coeffs(eta=hp["eta"], mu=mu_eff, lr_scale=scale, step=step_k,
                                     opts=opts, ok=ok)
                backend.fused_update_(opts, bufs, coeffs)
            hp["step"].copy_(step_k)
            idle = [tangents[i] for i, g in enumerate(grads) if g is None]
            idle += [states[i][k] for i, g in enumerate(grads) if g is None
                     for k in states[i] if k.startswith("tangent_")]
            if idle:  # not updated this step: Phi is the identity there, so Z <- mu Z
                torch._foreach_mul_(idle, torch.where(ok, mu_eff, torch.ones_like(mu_eff)))
            if self.max_tangent_ratio is not None:
                _safeguards.cap_tangents_(
                    params, tangents, [t for st in states for k, t in st.items() if k.startswith("tangent_")],
                    self.max_tangent_ratio, ok)
        for i in used:
            params[i].grad = grads[i]
        self._steps_called += 1

        if not train_mode:
            with _profiling.phase("hypergradient"):
                h, grad_e = self._validation_hypergrad(val_closure, params, tangents)
                ok = ok & torch.isfinite(h)
                self._lr_update(h, ok)
                if self.mu_auto:
                    self._auto_mu(grad_e, grads, ok)
        hp["skipped"].add_((~ok).to(torch.int64))
        if loss.device.type == "cpu":  # reading a CPU flag costs no device sync
            self._warn_if_skipped()
        return loss

    def _gradients(self, closure, params, tangents, need_hvp):
        engine_tangents = [z.to(p.dtype) for p, z in zip(params, tangents)]
        if self.hvp_engine is None:  # hvp="auto": timed once, on the first step with an HVP
            if not need_hvp:
                return ENGINES["reverse"](closure, params, engine_tangents, False)
            out, self.hvp_engine, self.hvp_timings, failures = time_engines(
                closure, params, engine_tangents, self.model)
            for name, reason in failures.items():
                warnings.warn(f"marthe_ext: hvp={name!r} does not work for this model ({reason})",
                              RuntimeWarning, stacklevel=_caller_stacklevel())
            return out
        return ENGINES[self.hvp_engine](closure, params, engine_tangents, need_hvp, self.model)

    def _partitions(self, params, states, grads, hvps, by_id):
        """GroupBuffers per (param group, dtype) over the params that got a gradient."""
        parts = []
        names = STATE_NAMES[self.dynamics]
        for group in self.param_groups:
            opts = self._options(group)
            buckets: dict[tuple, list[int]] = defaultdict(list)
            for p in group["params"]:
                i = by_id.get(id(p))
                if i is not None and grads[i] is not None:
                    buckets[(p.dtype, states[i]["tangent"].dtype)].append(i)
            for idx in buckets.values():
                hv = None
                if hvps is not None:
                    hv = [hvps[i] if hvps[i] is not None else torch.zeros_like(grads[i]) for i in idx]
                bufs = GroupBuffers(
                    params=[params[i] for i in idx],
                    grads=[grads[i] for i in idx],
                    hvps=hv,
                    tangents=[states[i]["tangent"] for i in idx],
                    state=tuple([states[i][n] for i in idx] for n in names),
                    state_tangents=tuple([states[i]["tangent_" + n] for i in idx] for n in names),
                )
                parts.append((opts, float(group["lr_scale"]), bufs))
        return parts

    def _sum(self, values) -> Tensor:
        total = torch.zeros_like(self._hyper["eta"])
        for v in values:
            total = total + v.to(torch.float64)
        return total

    def _lr_update(self, h: Tensor, ok: Tensor) -> None:
        """eta <- max(eta - beta h, 0) (and beta's own adaptation), only where ok."""
        hp = self._hyper
        beta = hp["beta"]
        if self.hyper_lr_rprop is not None:
            beta = _safeguards.adapted_hyper_lr(
                beta, h, hp["h_trend"], shrink=self.hyper_lr_rprop[0], grow=self.hyper_lr_rprop[1],
                low=self.hyper_lr_bounds[0], high=self.hyper_lr_bounds[1], ok=ok)
            hp["beta"].copy_(torch.where(ok, beta, hp["beta"]))
        hp["last_hypergrad"].copy_(h)
        eta_new = _safeguards.next_lr(
            hp["eta"], beta, h, norm=self.hypergrad_norm, sq_avg=hp["h_sq_avg"],
            count=hp["h_count"], decay=self.hypergrad_norm_decay, rho=self.max_lr_change, ok=ok,
            rho_up=self.max_lr_growth)
        if self.hyper_lr_adapt:
            beta_new = torch.clamp(hp["beta"] + self.hyper_lr_adapt * h * eta_new, min=0.0)
            hp["beta"].copy_(torch.where(ok, beta_new, hp["beta"]))
        hp["eta"].copy_(torch.where(ok, eta_new, hp["eta"]))

    def _validation_hypergrad(self, val_closure, params, tangents):
        """h = <grad E(w_{t+1}), Zw_{t+1}>; also grad E for mu='auto' ("grad" mode)."""
        if self.hypergrad == "grad":
            grad_e = validation_gradient(val_closure, params)
            pairs = [(g, z) for g, z in zip(grad_e, tangents) if g is not None]
            h = self._sum([self._resolve_backend().clipped_dot(
                [g for g, _ in pairs], [z for _, z in pairs], clip=self.grad_clip)]) if pairs \
                else torch.zeros_like(self._hyper["eta"])
            return h, grad_e
        zs = [z.to(p.dtype) for p, z in zip(params, tangents)]
        if self.hypergrad == "jvp":
            return jvp_hypergrad(val_closure, params, zs, self.model), None
        h, self._fd_error = fd_hypergrad(val_closure, params, zs)
        return h, None

    def _auto_mu(self, grad_e, grads, ok: Tensor) -> None:
        """The authors' rule: q = eta / <gE, gc>, z = clip(q, 0, 1), c <- c sign(mu) + mu,
        mu <- z ** (1 / (c + 1)).

        Defined everywhere (never NaN): <gE, gc> <= 0 or non-finite gives z = 0 (no evidence
        that the past helps, so forget it); 1 / (c + 1) with c + 1 <= 0 (c = -1 after the
        first update from the -1 sentinel) is +inf, so mu = 1 if z == 1 else 0.
        """
        hp = self._hyper
        pairs = [(ge, g) for ge, g in zip(grad_e, grads) if ge is not None and g is not None]
        dot = self._sum([self._resolve_backend().clipped_dot(
            [a for a, _ in pairs], [b for _, b in pairs], clip=self.grad_clip, clip_b=True)]) \
            if pairs else torch.zeros_like(hp["eta"])
        q = hp["eta"] / torch.where(dot > 0, dot, torch.ones_like(dot))
        z = torch.where(dot > 0, torch.clamp(q, 0.0, 1.0), torch.zeros_like(q))
        c_new = hp["mu_counter"] * torch.sign(hp["mu"]) + hp["mu"]
        exponent = torch.where(c_new + 1 > 0, 1.0 / torch.clamp(c_new + 1, min=1e-300),
                               torch.full_like(c_new, math.inf))
        mu_new = torch.pow(z, exponent)
        hp["mu_counter"].copy_(torch.where(ok, c_new, hp["mu_counter"]))
        hp["mu"].copy_(torch.where(ok, mu_new, hp["mu"]))

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["marthe"] = {
            "dynamics": self.dynamics,
            "mu_auto": self.mu_auto,
            "steps_called": self._steps_called,
            "hvp_engine": self.hvp_engine,
            **{k: v.detach().clone() for k, v in self._hyper.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a Marthe checkpoint; every check runs before anything is changed."""
        if not isinstance(state_dict, dict) or "marthe" not in state_dict:
            raise ValueError("not a Marthe state dict (no 'marthe' entry): was it saved by "
                             "marthe_ext.Marthe.state_dict()?")
        meta = state_dict["marthe"]
        if meta["dynamics"] != self.dynamics:
            raise ValueError(f"state dict is for dynamics={meta['dynamics']!r}, "
                             f"this optimizer has dynamics={self.dynamics!r}")
        if bool(meta["mu_auto"]) != self.mu_auto:
            raise ValueError("state dict and optimizer disagree on mu='auto'")
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
        expected = {"tangent"} | {n for s in STATE_NAMES[self.dynamics] for n in (s, "tangent_" + s)}
        for key, st in state_dict["state"].items():
            if key not in id_to_param:
                raise ValueError(f"state dict has state for unknown parameter {key}")
            p = id_to_param[key]
            if set(st) != expected:
                raise ValueError(f"state of parameter {key} has entries {sorted(st)}, "
                                 f"expected {sorted(expected)}")
            for name, t in st.items():
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"state '{name}' of parameter {key} has shape {tuple(t.shape)}, "
                                     f"the parameter has shape {tuple(p.shape)}")
        for k in _HYPER_KEYS:
            if k not in meta:
                raise ValueError(f"state dict lacks the hyper-state entry {k!r}")

        # All checks passed: now change things.
        self.state = defaultdict(dict)
        for key, st in state_dict["state"].items():
            p = id_to_param[key]
            self.state[p] = {name: t.detach().to(device=p.device, dtype=_state_dtype(p)).clone()
                             for name, t in st.items()}
        for sg, g in zip(saved_groups, self.param_groups):
            for k in ("lr_scale", "weight_decay"):
                if k in sg:
                    g[k] = sg[k]
        for k in _HYPER_KEYS:
            self._hyper[k].copy_(meta[k])
        for k in _HYPER_KEYS_SINCE_V1:
            if k in meta:
                self._hyper[k].copy_(meta[k])
            else:
                self._hyper[k].zero_()
        self._steps_called = int(meta["steps_called"])
        if self.hvp == "auto":
            self.hvp_engine = meta.get("hvp_engine")


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
