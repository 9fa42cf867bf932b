"""``MartheConfig``: every constructor option of ``Marthe``, validated once, frozen.

``MartheConfig.from_arguments(...)`` resolves the safeguard preset, fills the defaults that
depend on other options (``hyper_lr``) and checks every value and every combination before
anything else is built; a bad argument raises ``ValueError``/``TypeError`` naming it. The
result is immutable: the hyper-controller and the step protocol read it, nothing writes it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from . import safeguards as _safeguards
from .backends import BACKENDS
from .backends.api import DYNAMICS, GroupOptions
from .hvp import HVP_ENGINES
from .hypergrad import HYPERGRAD_MODES


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``float(value)`` if it is a real number in the interval, else a clear error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if (math.isnan(value) or value < low or value > high
            or (low_open and value == low) or (high_open and value == high)):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")
    return value


def check_choice(name: str, value: Any, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def _pair(name: str, value: Any, what: str) -> tuple:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"{name} must be a pair {what}, got {value!r}")
    return tuple(value)


def check_every(name: str, value: Any) -> int:
    """A period k >= 1 (an int, not a bool), else a clear error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (1: every step, the exact algorithm), got {value}")
    return int(value)


def _check_modes(first_order: Any, hvp_every: Any, hypergrad_every: Any, mu: Any) -> tuple[bool, int, int]:
    if not isinstance(first_order, bool):
        raise TypeError(f"first_order must be a bool, got {first_order!r}")
    hvp_every = check_every("hvp_every", hvp_every)
    hypergrad_every = check_every("hypergrad_every", hypergrad_every)
    if hvp_every > 1 and first_order:
        raise ValueError("hvp_every > 1 and first_order=True contradict each other: first_order "
                         "takes no HVP at all")
    if hvp_every > 1 and mu == 0:
        raise ValueError("hvp_every > 1 has no effect with mu=0 (HD takes no HVP): leave it at 1")
    return first_order, hvp_every, hypergrad_every


@dataclass(frozen=True)
class MartheConfig:
    """The options of one ``Marthe`` optimizer (see its docstring for their meaning)."""

    lr: float
    dynamics: str
    momentum: float
    nesterov: bool
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    mu: Union[float, str]  # a number in [0, 1] or "auto"
    hyper_lr: float  # beta at the start (resolved: never None)
    hyper_lr_adapt: float
    grad_clip: Optional[float]
    hvp: str
    hypergrad: str
    backend: str
    max_lr_change: Optional[float]
    max_lr_growth: Optional[float]
    hypergrad_norm: Optional[str]
    hypergrad_norm_decay: float
    max_tangent_ratio: Optional[float]
    hyper_lr_rprop: Optional[tuple[float, float]]
    hyper_lr_bounds: tuple[float, float]
    safeguards: Optional[str]
    loss_trust: Optional[float] = None  # (e): tau of the loss trust region (controller.py)
    decay_trend: Optional[float] = None  # (f): z of the decay-trend test on the step of decreases (controller.py)
    decay_trend_test: str = "mean"  # (f): the trend of the normalised h ("mean") or of its sign ("sign")
    # The cheaper modes (README "Cheaper steps"): each drops part of the exact step on purpose.
    first_order: bool = False  # A_t with H_t = 0: no HVP at all
    hvp_every: int = 1  # the HVP only on steps t = 0 mod k, H_t = 0 on the others
    hypergrad_every: int = 1  # the hypergradient and LR update only on steps t = 0 mod k
    compile_lr_update: bool = False  # the LR update as one torch.compile'd function (fused_lr.py)

    @property
    def mu_auto(self) -> bool:
        return self.mu == "auto"

    @property
    def mu_fixed(self) -> Optional[float]:
        """mu as a host number (None with "auto"): deciding whether a step needs an HVP
        must not read a device scalar."""
        return None if self.mu_auto else self.mu

    def group_options(self, weight_decay: float) -> GroupOptions:
        return GroupOptions(dynamics=self.dynamics, weight_decay=float(weight_decay),
                            grad_clip=self.grad_clip, momentum=self.momentum,
                            nesterov=self.nesterov, beta1=self.beta1, beta2=self.beta2, eps=self.eps)

    @classmethod
    def from_arguments(
        cls, *, lr, dynamics, momentum, nesterov, betas, eps, weight_decay, mu, hyper_lr,
        hyper_lr_adapt, grad_clip, hvp, hypergrad, backend, max_lr_change, max_lr_growth,
        hypergrad_norm, hypergrad_norm_decay, max_tangent_ratio, hyper_lr_rprop,
        hyper_lr_bounds, safeguards, has_model: bool, first_order=False, hvp_every=1,
        hypergrad_every=1, compile_lr_update=False, loss_trust=None, decay_trend=None,
        decay_trend_test=None,
    ) -> "MartheConfig":
        if safeguards is not None and safeguards not in _safeguards.PRESETS:
            raise ValueError(f"safeguards must be None or one of {tuple(_safeguards.PRESETS)}, "
                             f"got {safeguards!r}")
        preset = _safeguards.PRESETS.get(safeguards, {})
        rprop_from_preset = hyper_lr_rprop is None and preset.get("hyper_lr_rprop") is not None
        if hypergrad_norm is None:
            hypergrad_norm = preset.get("hypergrad_norm")
        if max_lr_growth is None:
            max_lr_growth = preset.get("max_lr_growth")
        if hyper_lr_rprop is None:
            hyper_lr_rprop = preset.get("hyper_lr_rprop")
        if loss_trust is None:
            loss_trust = preset.get("loss_trust")
        if decay_trend is None:
            decay_trend = preset.get("decay_trend")
        test_given = decay_trend_test is not None
        if decay_trend_test is None:
            decay_trend_test = preset.get("decay_trend_test", "mean")
        if hyper_lr is None:
            hyper_lr = _safeguards.DEFAULT_HYPER_LR["raw" if hypergrad_norm is None else "normalised"]

        lr = check_number("lr", lr, 0.0)
        check_choice("dynamics", dynamics, DYNAMICS)
        momentum = check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
        if nesterov and (dynamics != "sgdm" or momentum == 0):
            raise ValueError("nesterov=True needs dynamics='sgdm' and momentum > 0")
        betas = _pair("betas", betas, "(beta1, beta2)")
        beta1 = check_number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        beta2 = check_number("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        eps = check_number("eps", eps, 0.0, low_open=True)
        weight_decay = check_number("weight_decay", weight_decay, 0.0)
        if isinstance(mu, str):
            if mu != "auto":
                raise ValueError(f"mu must be a number in [0, 1] or 'auto', got {mu!r}")
        else:
            mu = check_number("mu", mu, 0.0, 1.0)
        hyper_lr = check_number("hyper_lr", hyper_lr, 0.0)
        hyper_lr_adapt = check_number("hyper_lr_adapt", hyper_lr_adapt, 0.0)
        if hyper_lr_adapt and rprop_from_preset:
            raise ValueError(f"hyper_lr_adapt (the paper's additive beta adaptation) conflicts with "
                             f"safeguards={safeguards!r}, which adapts beta itself: pass safeguards=None")
        if grad_clip is not None:
            grad_clip = check_number("grad_clip", grad_clip, 0.0, low_open=True)
        check_choice("hvp", hvp, HVP_ENGINES)
        check_choice("hypergrad", hypergrad, HYPERGRAD_MODES)
        check_choice("backend", backend, BACKENDS)
        if not has_model and (hvp in ("forward", "forward-eager") or hypergrad == "jvp"):
            raise ValueError(
                f"hvp={hvp!r}, hypergrad={hypergrad!r} need the model: pass model=my_module")
        if mu == "auto" and hypergrad != "grad":
            raise ValueError("mu='auto' needs hypergrad='grad' (it uses the validation gradient)")

        if max_lr_change is not None:
            max_lr_change = check_number("max_lr_change", max_lr_change, 1.0, low_open=True)
        if max_lr_growth is not None:
            max_lr_growth = check_number("max_lr_growth", max_lr_growth, 1.0, low_open=True)
        if hypergrad_norm not in _safeguards.HYPERGRAD_NORMS:
            raise ValueError(f"hypergrad_norm must be one of {_safeguards.HYPERGRAD_NORMS}, "
                             f"got {hypergrad_norm!r}")
        if hypergrad_norm == "rms-log" and lr == 0:
            raise ValueError("lr must be > 0 with hypergrad_norm='rms-log' (the default safeguards): the LR "
                             "moves in log space, so 0 would stay 0; pass safeguards=None for the paper's "
                             "update from lr=0")
        hypergrad_norm_decay = check_number("hypergrad_norm_decay", hypergrad_norm_decay, 0.0, 1.0,
                                            high_open=True)
        if loss_trust is not None:
            loss_trust = check_number("loss_trust", loss_trust, 0.0, math.inf, low_open=True, high_open=True)
        if max_tangent_ratio is not None:
            max_tangent_ratio = check_number("max_tangent_ratio", max_tangent_ratio, 0.0, low_open=True)
        # The bounds are checked whether or not rprop uses them: a bad value is never kept silently.
        hyper_lr_bounds = _pair("hyper_lr_bounds", hyper_lr_bounds, "(min, max)")
        low = check_number("hyper_lr_bounds[0]", hyper_lr_bounds[0], 0.0, low_open=True)
        high = check_number("hyper_lr_bounds[1]", hyper_lr_bounds[1], low)
        if hyper_lr_rprop is not None:
            hyper_lr_rprop = _pair("hyper_lr_rprop", hyper_lr_rprop, "(shrink, grow)")
            shrink = check_number("hyper_lr_rprop[0] (shrink)", hyper_lr_rprop[0], 0.0, 1.0, low_open=True)
            grow = check_number("hyper_lr_rprop[1] (grow)", hyper_lr_rprop[1], 1.0)
            if hypergrad_norm is None:
                raise ValueError("hyper_lr_rprop adapts a scale-free beta: set hypergrad_norm='rms-log' "
                                 "(or 'rms') with it")
            if hyper_lr_adapt:
                raise ValueError("hyper_lr_rprop and hyper_lr_adapt both adapt beta: choose one")
            if hyper_lr != 0 and not low <= hyper_lr <= high:
                raise ValueError(f"hyper_lr={hyper_lr} must be 0 (LR fixed) or lie in "
                                 f"hyper_lr_bounds [{low}, {high}] when hyper_lr_rprop is set")
            hyper_lr_rprop = (shrink, grow)
        if decay_trend is not None:
            decay_trend = check_number("decay_trend", decay_trend, 0.0, math.inf, low_open=True, high_open=True)
            if hyper_lr_rprop is None:
                raise ValueError("decay_trend changes how hyper_lr_rprop adapts beta: set hyper_lr_rprop "
                                 "(and hypergrad_norm) with it")
        check_choice("decay_trend_test", decay_trend_test, _safeguards.DECAY_TREND_TESTS)
        if test_given and decay_trend is None:
            raise ValueError(f"decay_trend_test={decay_trend_test!r} chooses the statistic of decay_trend (safeguard "
                             f"(f)), which is off: set decay_trend too")

        first_order, hvp_every, hypergrad_every = _check_modes(first_order, hvp_every, hypergrad_every, mu)
        if not isinstance(compile_lr_update, bool):
            raise TypeError(f"compile_lr_update must be a bool, got {compile_lr_update!r}")

        return cls(
            lr=lr, dynamics=dynamics, momentum=momentum, nesterov=nesterov, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay, mu=mu, hyper_lr=hyper_lr,
            hyper_lr_adapt=hyper_lr_adapt, grad_clip=grad_clip, hvp=hvp, hypergrad=hypergrad,
            backend=backend, max_lr_change=max_lr_change, max_lr_growth=max_lr_growth,
            hypergrad_norm=hypergrad_norm, hypergrad_norm_decay=hypergrad_norm_decay,
            max_tangent_ratio=max_tangent_ratio, hyper_lr_rprop=hyper_lr_rprop,
            hyper_lr_bounds=(low, high), safeguards=safeguards, first_order=first_order,
            hvp_every=hvp_every, hypergrad_every=hypergrad_every, compile_lr_update=compile_lr_update,
            loss_trust=loss_trust, decay_trend=decay_trend, decay_trend_test=decay_trend_test,
        )
