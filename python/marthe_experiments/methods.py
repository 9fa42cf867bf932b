"""Every compared method behind one small interface (``Trainer``).

A ``Protocol`` fixes what all methods share (inner dynamics, eta0, momentum, weight
decay, gradient clipping); a ``MethodSpec`` names a method family and its own
hyperparameters. ``Trainer.step`` runs one optimisation step from a training-loss
closure (and a validation-loss closure, which only the hypergradient methods use) and
``Trainer.lr`` reports the learning rate the next step will use.

Families:
  Constant, Exponential      torch.optim.SGD / Adam with a fixed or decaying LR
  LRS-OPT                    torch.optim.SGD replaying a given per-step schedule
  HD, RTHO, MARTHE           marthe_ext.Marthe with mu = 0, 1 or in between
  SF-SGD, SF-AdamW           schedule-free optimisers (pip install schedulefree)
  Prodigy                    learning-rate-free Adam (pip install prodigyopt)
"""
from __future__ import annotations

import contextlib
import importlib
import io
import math
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

import marthe_ext

from . import parallel

HYPERGRAD_FAMILIES = ("HD", "RTHO", "MARTHE")
SCHEDULE_FAMILIES = ("LRS-OPT", "Constant", "Exponential")
LR_FREE_FAMILIES = ("SF-SGD", "SF-AdamW", "Prodigy")
FAMILIES = SCHEDULE_FAMILIES + HYPERGRAD_FAMILIES + LR_FREE_FAMILIES

_OPTIONAL = {"SF-SGD": "schedulefree", "SF-AdamW": "schedulefree", "Prodigy": "prodigyopt"}


@dataclass(frozen=True)
class Protocol:
    """What every method in one comparison shares."""

    dynamics: str                      # "sgd" | "sgdm" | "adam"
    lr: float                          # eta0
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None  # elementwise, as in the paper
    hvp: str = "reverse"
    hypergrad: str = "grad"
    backend: str = "auto"
    marthe_options: tuple = ()         # extra Marthe keyword arguments, e.g. (("max_lr_change", 2.0),)


@dataclass
class MethodSpec:
    """A method family and its hyperparameters (beta, mu, gamma, ...)."""

    family: str
    hp: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown method family {self.family!r}; choose from {FAMILIES}")

    @property
    def label(self) -> str:
        if not self.hp:
            return self.family
        inner = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(self.hp.items()) if k != "schedule")
        return f"{self.family} ({inner})" if inner else self.family


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def availability(family: str) -> Optional[str]:
    """None when the family can run here, else why not (with the install command)."""
    module = _OPTIONAL.get(family)
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except ImportError:
        return f"not installed: pip install {module}"
    return None


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Trainer:
    """One method, one model: ``step``, ``lr``, ``end_epoch``, ``evaluation``."""

    def __init__(self, spec: MethodSpec, model: nn.Module, protocol: Protocol, decay_per: str = "step"):
        why_not = availability(spec.family)
        if why_not:
            raise RuntimeError(f"{spec.family}: {why_not}")
        if decay_per not in ("step", "epoch"):
            raise ValueError(f"decay_per must be 'step' or 'epoch', got {decay_per!r}")
        self.spec, self.model, self.protocol, self.decay_per = spec, model, protocol, decay_per
        self.family = spec.family
        self.schedule: Optional[list] = None
        params = [p for p in model.parameters() if p.requires_grad]
        p, hp = protocol, spec.hp
        if self.family in HYPERGRAD_FAMILIES:
            mu = {"HD": 0.0, "RTHO": 1.0}.get(self.family, hp.get("mu"))
            if mu is None or "beta" not in hp:
                raise ValueError(f"{self.family} needs hp['beta']" + (" and hp['mu']" if mu is None else ""))
            # The paper's algorithm unless the method names a safeguard preset (hp["safeguards"]),
            # whatever the library's default: the experiments reproduce the paper.
            options = {"safeguards": hp.get("safeguards"), **dict(p.marthe_options)}
            self.opt = marthe_ext.Marthe(
                params, lr=hp.get("lr", p.lr), dynamics=p.dynamics, momentum=p.momentum,
                weight_decay=p.weight_decay, mu=mu, hyper_lr=hp["beta"], grad_clip=p.grad_clip,
                hvp=p.hvp, hypergrad=p.hypergrad, backend=p.backend, model=model, **options)
        elif self.family in SCHEDULE_FAMILIES:
            if self.family == "LRS-OPT":
                self.schedule = [float(v) for v in hp["schedule"]]
            lr = self.schedule[0] if self.schedule else hp.get("lr", p.lr)
            if p.dynamics in ("sgd", "sgdm"):
                momentum = p.momentum if p.dynamics == "sgdm" else 0.0
                self.opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=p.weight_decay)
            elif p.dynamics == "adam":
                self.opt = torch.optim.Adam(params, lr=lr, weight_decay=p.weight_decay)
            else:
                self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=p.weight_decay)
            self.gamma = float(hp.get("gamma", 1.0)) if self.family == "Exponential" else 1.0
        elif self.family in ("SF-SGD", "SF-AdamW"):
            import schedulefree

            if self.family == "SF-SGD":
                self.opt = schedulefree.SGDScheduleFree(params, lr=hp.get("lr", p.lr), momentum=p.momentum,
                                                        weight_decay=p.weight_decay)
            else:
                self.opt = schedulefree.AdamWScheduleFree(params, lr=hp.get("lr", p.lr),
                                                          weight_decay=p.weight_decay)
            self.opt.train()
        else:
            import prodigyopt

            with contextlib.redirect_stdout(io.StringIO()):  # it prints its weight-decay mode
                self.opt = prodigyopt.Prodigy(params, lr=hp.get("lr", 1.0), weight_decay=p.weight_decay)
        self._params = params
        self._steps = 0

    @property
    def lr(self) -> float:
        """The LR the next step uses (Prodigy: d * lr, its effective step size)."""
        if self.family in HYPERGRAD_FAMILIES:
            return self.opt.lr
        group = self.opt.param_groups[0]
        if self.family == "Prodigy":
            return float(group["d"] * group["lr"])
        if self.family in ("SF-SGD", "SF-AdamW") and group.get("scheduled_lr"):
            return float(group["scheduled_lr"])
        return float(group["lr"])

    @property
    def skipped_steps(self) -> int:
        return self.opt.skipped_steps if self.family in HYPERGRAD_FAMILIES else 0

    def step(self, train_loss: Callable[[], Tensor], val_loss: Optional[Callable[[], Tensor]] = None) -> float:
        """One step; returns the training loss before it (a float, maybe non-finite)."""
        if self.family in HYPERGRAD_FAMILIES:
            return float(self.opt.step(train_loss, val_closure=val_loss))
        self.opt.zero_grad(set_to_none=True)
        loss = train_loss()
        loss.backward()
        if self.protocol.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(self._params, self.protocol.grad_clip)
        self.opt.step()
        self._steps += 1
        if self.family == "Exponential" and self.decay_per == "step":
            self._decay()
        elif self.schedule is not None and self._steps < len(self.schedule):
            self.opt.param_groups[0]["lr"] = self.schedule[self._steps]
        return float(loss.detach())

    def end_epoch(self) -> None:
        if self.family == "Exponential" and self.decay_per == "epoch":
            self._decay()

    def _decay(self) -> None:
        for g in self.opt.param_groups:
            g["lr"] *= self.gamma

    @contextlib.contextmanager
    def evaluation(self, recalibrate: Optional[Callable[[], None]] = None) -> Iterator[None]:
        """Model in eval mode with the weights to evaluate.

        Schedule-free methods train at y but evaluate at their average x: swap in x and,
        when the model has BatchNorm, refresh its running statistics for x (``recalibrate``
        runs a few training batches forward), as schedulefree's documentation asks.
        """
        swap = self.family in ("SF-SGD", "SF-AdamW")
        was_training = self.model.training
        if swap:
            self.opt.eval()
            if recalibrate is not None and has_batchnorm(self.model):
                self.model.train()
                with torch.no_grad():
                    recalibrate()
        parallel.sync_buffers(self.model)  # torchrun: rank 0's BatchNorm statistics everywhere
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)
            if swap:
                self.opt.train()


def from_preset(cls, presets: dict, preset: str, overrides: dict, what: str):
    """``cls`` (a config dataclass) from a named preset, with the non-None overrides on top."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {tuple(presets)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} settings {sorted(unknown)}")
    return cls(**{**presets[preset], **{k: v for k, v in overrides.items() if v is not None}})


def log_uniform(gen: torch.Generator, low: float, high: float) -> float:
    """A sample of exp(U[log low, log high]) from a seeded generator."""
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
