"""The MARTHE step protocol (SPEC section 2), in order:

1. gradients (and the HVP ``H Zw`` when mu may be > 0, the tangent is not new and the step
   takes one: not with ``first_order``, every k-th with ``hvp_every``) from the training
   closure through an HVP engine (``hvp.py``); optionally the HVP from a sub-batch
   ``hvp_closure``; under data parallelism averaged over the ranks with the loss
   (``distributed.py``; so are the validation gradient or h in step 5);
2. one device flag ``ok``: the loss, gradients and HVPs are finite;
3. train mode: ``h = <g_c, Zw>`` and the LR update before the step (``HyperController``);
4. the fused update of weights, optimizer state and tangents per (group, dtype) partition
   (a backend, ``backends/``), idle tangents decayed by mu, the optional tangent cap;
5. val mode: ``h = <grad E(w_{t+1}), Zw_{t+1}>`` and the LR update (and auto-mu) after it.
   Steps 3 and 5 run every k-th step only with ``hypergrad_every=k``.

Nothing here reads a device value on the host. The optimizer class wires this to its
param groups and state; the rules for eta, beta and mu are the controller's.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _profiling
from .backends import select_backend
from .backends.api import STATE_NAMES, GroupBuffers, make_coeffs
from .config import MartheConfig
from .distributed import resolve_sync
from .controller import HyperController
from . import hvp as _hvp
from .compiled import auto_choice_message
from .hvp import ENGINES, time_engines
from .hypergrad import fd_hypergrad, jvp_hypergrad, validation_gradient
from .safeguards import cap_tangents_
from .training_loop import GroupStepSizes, backward_gradients


def state_dtype(p: Tensor) -> torch.dtype:
    """Optimizer state and tangents: float32 for low-precision params, else the param dtype."""
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


def init_state(state: dict, p: Tensor, dynamics: str) -> dict:
    """Zero tangent, optimizer state and state tangents for ``p``, created on first use."""
    if "tangent" not in state:
        sdt = state_dtype(p)
        state["tangent"] = torch.zeros_like(p, dtype=sdt, memory_format=torch.contiguous_format)
        for name in STATE_NAMES[dynamics]:
            state[name] = torch.zeros_like(state["tangent"])
            state["tangent_" + name] = torch.zeros_like(state["tangent"])
    return state


def state_tangents(states: Sequence[dict]) -> list[Tensor]:
    return [t for st in states for k, t in st.items() if k.startswith("tangent_")]


class StepProtocol:
    """Runs ``Marthe.step`` for one optimizer: engine choice, backend, hypergradients."""

    def __init__(self, config: MartheConfig, controller: HyperController,
                 model: Optional[torch.nn.Module], device: torch.device,
                 warn: Callable[[str], None], process_group=None):
        self.config = config
        self.process_group = process_group  # validated by the optimizer, resolved on first use
        self._sync = None
        self.controller = controller
        self.model = model
        self.device = device
        self.warn = warn
        self.hvp_engine: Optional[str] = None if config.hvp == "auto" else config.hvp
        self.hvp_timings: dict[str, float] = {}  # hvp="auto": seconds per engine, first step
        self.fd_error: Optional[Tensor] = None
        self.steps_called = 0
        self._backend = None
        self.step_sizes = GroupStepSizes(controller.eta)  # group["lr"] and schedulers
        self.scaler = None  # amp.LossScaler with Marthe(loss_scale=...), set by the optimizer

    @property
    def sync(self):
        """The data-parallel sync (``distributed.py``), resolved on the first step so that the
        optimizer may be built before ``init_process_group``."""
        if self._sync is None:
            self._sync = resolve_sync(self.process_group)
        return self._sync

    @property
    def backend(self):
        if self._backend is None:
            self._backend = select_backend(self.config.backend, self.device)
        return self._backend

    def needs_hvp(self) -> bool:
        """mu may be > 0, the tangent is no longer zero (it is zero before the first step), the
        step is not first-order, and with ``hvp_every = k`` the step index t = 0 mod k.

        t is ``steps_called`` (a host int, checkpointed): the phase survives a resume and no
        device value is read."""
        cfg, t = self.config, self.steps_called
        return cfg.mu_fixed != 0.0 and not cfg.first_order and t > 0 and t % cfg.hvp_every == 0

    def hypergrad_due(self) -> bool:
        """``hypergrad_every = k``: the hypergradient and the LR update only on steps t = 0 mod k."""
        return self.steps_called % self.config.hypergrad_every == 0

    # ------------------------------------------------------------------ the step
    def step(self, param_groups: list[dict], state: dict, closure, val_closure,
             hvp_closure, backward_loss: Optional[Tensor] = None) -> Optional[Tensor]:
        """Returns the training loss (detached); in backward style (no closure) the
        ``backward_loss`` the caller gave, or None."""
        cfg, ctl = self.config, self.controller
        if closure is not None and not callable(closure):
            raise TypeError("closure must be a callable returning the training loss (it must not "
                            "call backward), or None to take the gradient from .grad")
        if val_closure is not None and not callable(val_closure):
            raise TypeError("val_closure must be a callable returning the validation loss")
        if hvp_closure is not None and not callable(hvp_closure):
            raise TypeError("hvp_closure must be a callable returning a sub-batch training loss")
        if cfg.mu_auto and val_closure is None:
            raise ValueError("mu='auto' needs val_closure (it uses the validation gradient)")
        if backward_loss is not None:
            if closure is not None:
                raise ValueError("pass the loss either as a closure or as loss= (backward style), not both")
            if not isinstance(backward_loss, Tensor) or backward_loss.numel() != 1:
                raise TypeError(f"loss= must be the scalar loss tensor you called backward on, "
                                f"got {type(backward_loss).__name__}")
        if cfg.first_order and hvp_closure is not None:
            raise ValueError("hvp_closure is unused with first_order=True (no HVP is taken): drop it")
        backend = self.backend
        params = [p for g in param_groups for p in g["params"] if p.requires_grad]
        if not params:
            raise ValueError("no parameter requires grad: nothing to optimize")
        states = [init_state(state[p], p, cfg.dynamics) for p in params]
        tangents = [s["tangent"] for s in states]
        need_hvp = self.needs_hvp()
        lr_step = self.hypergrad_due()
        scales = self.step_sizes.scales(param_groups)  # lr_scale * the scheduler's multiplier

        scaler = self.scaler
        if scaler is not None:  # float16 autocast: the engines differentiate S * loss (amp.py)
            closure, hvp_closure = scaler.scaled(closure), scaler.scaled(hvp_closure)

        self.sync.broadcast_parameters_once(params)  # data parallel: one start for all ranks

        # 1. gradients and HVPs
        hvp_from_closure = hvp_closure is not None and need_hvp
        started: list = []  # the gradient's reduction, when launched before the HVP
        if closure is None:  # backward style: .grad and its graph (training_loop.py)
            loss = None if backward_loss is None else backward_loss.detach().reshape(())
            grads, hvps = backward_gradients(params, [z.to(p.dtype) for p, z in zip(params, tangents)],
                                             need_hvp and not hvp_from_closure, cfg.hvp)
        else:
            with self._overlapped(params, started, enabled=scaler is None):
                loss, grads, hvps = self._gradients(closure, params, tangents, need_hvp and not hvp_from_closure)
        if hvp_from_closure:
            # The sub-batch evaluation is a probe: BatchNorm statistics move once per step.
            with _hvp.restored_buffers(self.model):
                _, _, hvps = self._gradients(hvp_closure, params, tangents, True)
        grads, hvps = self._dense_contiguous(grads, hvps)
        if scaler is not None:
            loss, grads, hvps = scaler.unscale(loss, grads, hvps)
        # Data parallel: the means over the ranks; every gradient is then a tensor (zeros
        # stand for this rank's missing ones; `unused` undoes what no rank had).
        loss, grads, hvps, unused = self.sync.average_gradients(
            loss, grads, hvps, params, states, started[0] if started else None)

        # 2. the finite flag
        used = [i for i, g in enumerate(grads) if g is not None]
        checked = [grads[i] for i in used]
        if hvps is not None:
            checked += [hvps[i] for i in used if hvps[i] is not None]
        ok = torch.isfinite(loss) if loss is not None else torch.ones((), dtype=torch.bool, device=self.device)
        if checked:
            ok = ok & backend.all_finite([checked])
        if scaler is not None:  # back off after an overflow, grow after a run of finite steps
            scaler.update(ok)
        parts = self._partitions(param_groups, params, states, grads, hvps, scales)

        # 3. train mode: the hypergradient before the update
        train_mode = val_closure is None
        if train_mode and lr_step:
            with _profiling.phase("hypergradient"):
                h = self._sum(backend.clipped_dot(
                    b.grads, b.tangents, clip=cfg.grad_clip, a_extra=b.params,
                    a_extra_scale=o.coupled_weight_decay) for o, _, b in parts)
                if unused is not None:
                    h = h - unused.hypergrad_correction(parts, backend, cfg.grad_clip)
                ok = ok & torch.isfinite(h)
                ctl.update_lr(h, ok, loss)

        # auto-mu weighs grad E against this step's gc = clip(g + wd w_t): the coupled L2 term
        # needs w_t, which the update is about to overwrite.
        mu_grads = self._coupled_gradients(param_groups, params, grads) if cfg.mu_auto else None

        # 4. the fused update
        with _profiling.phase("fused_update"):
            step_k = ctl.count_step(ok)
            mu_eff = ctl.mu_for_tangent()
            for opts, scale, bufs in parts:
                coeffs = make_coeffs(eta=ctl.eta, mu=mu_eff, lr_scale=scale, step=step_k,
                                     opts=opts, ok=ok)
                backend.fused_update_(opts, bufs, coeffs)
            idle = [i for i, g in enumerate(grads) if g is None]
            if idle:  # not updated this step: Phi is the identity there, so Z <- mu Z
                idle_tangents = [tangents[i] for i in idle] + state_tangents([states[i] for i in idle])
                torch._foreach_mul_(idle_tangents, torch.where(ok, mu_eff, torch.ones_like(mu_eff)))
            if unused is not None:
                unused.restore_idle_(ok, mu_eff)
            if cfg.max_tangent_ratio is not None:
                cap_tangents_(params, tangents, state_tangents(states), cfg.max_tangent_ratio, ok)
        for i in used:
            params[i].grad = grads[i]
        self.steps_called += 1

        # 5. val mode: the hypergradient after the update
        if not train_mode and lr_step:
            with _profiling.phase("hypergradient"):
                h, grad_e = self._validation_hypergrad(val_closure, params, tangents)
                ok = ok & torch.isfinite(h)
                ctl.update_lr(h, ok, loss)
                if cfg.mu_auto:
                    ctl.update_mu(self._dot_val_train(grad_e, mu_grads), ok)
        ctl.count_skip(ok)
        self.step_sizes.publish(param_groups)
        return loss

    # ------------------------------------------------------------------ pieces
    def _gradients(self, closure, params, tangents, need_hvp):
        engine_tangents = [z.to(p.dtype) for p, z in zip(params, tangents)]
        if self.hvp_engine is None:  # hvp="auto": timed once, on the first step with an HVP
            if not need_hvp:
                return ENGINES["reverse"](closure, params, engine_tangents, False)
            out, self.hvp_engine, self.hvp_timings, failures = time_engines(
                closure, params, engine_tangents, self.model)
            self.hvp_engine = self.sync.agree(self.hvp_engine)  # ranks time differently
            if failures:
                self.warn(auto_choice_message(self.hvp_engine, failures))
            return out
        return ENGINES[self.hvp_engine](closure, params, engine_tangents, need_hvp, self.model)

    @contextlib.contextmanager
    def _overlapped(self, params, started: list, enabled: bool):
        """Data parallel with the "reverse" or "fd" engine: the gradient's all-reduce is
        launched as soon as the engine has the gradient and runs while it takes the HVP
        (``hvp.on_gradients``) and lands in ``started``. Not on
        hvp="auto"'s timing step (several engines run) nor with loss scaling (the gradient
        is unscaled after the engine)."""
        if not enabled or self.sync.world_size == 1 or self.hvp_engine is None:
            yield
            return

        def launch(loss, grads):
            started.append(self.sync.start_gradients(loss, self._dense_contiguous(grads, None)[0], params))

        with _hvp.on_gradients(launch):
            yield

    @staticmethod
    def _dense_contiguous(grads, hvps):
        for i, g in enumerate(grads):
            if g is not None and g.is_sparse:
                raise ValueError(f"Marthe does not support sparse gradients (parameter {i}); "
                                 f"use dense gradients, e.g. nn.Embedding(sparse=False)")
        # The fused kernels index tensors flat: conv HVPs (and some grads) come back
        # with permuted strides. contiguous() is free for the usual contiguous case.
        grads = [None if g is None else g.contiguous() for g in grads]
        if hvps is not None:
            hvps = [None if h is None else h.contiguous() for h in hvps]
        return grads, hvps

    def _partitions(self, param_groups, params, states, grads, hvps, scales):
        """GroupBuffers per (param group, dtype) over the params that got a gradient, with the
        group's ``d step size / d eta`` (a device scalar, ``GroupStepSizes.scales``)."""
        by_id = {id(p): i for i, p in enumerate(params)}
        parts = []
        names = STATE_NAMES[self.config.dynamics]
        for group, scale in zip(param_groups, scales):
            opts = self.config.group_options(group["weight_decay"])
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
                parts.append((opts, scale, bufs))
        return parts

    def _sum(self, values) -> Tensor:
        total = self.controller.zero()
        for v in values:
            total = total + v.to(torch.float64)
        return total

    def _validation_hypergrad(self, val_closure, params, tangents):
        """h = <grad E(w_{t+1}), Zw_{t+1}>; also grad E for mu='auto' ("grad" mode)."""
        mode = self.config.hypergrad
        if mode == "grad":
            # averaged before the clip: one process clips the global batch's gradient
            grad_e = self.sync.average_list(validation_gradient(val_closure, params), params)
            pairs = [(g, z) for g, z in zip(grad_e, tangents) if g is not None]
            h = self._sum([self.backend.clipped_dot(
                [g for g, _ in pairs], [z for _, z in pairs], clip=self.config.grad_clip)]) \
                if pairs else self.controller.zero()
            return h, grad_e
        zs = [z.to(p.dtype) for p, z in zip(params, tangents)]
        if mode == "jvp":
            return self.sync.average_scalars(jvp_hypergrad(val_closure, params, zs, self.model))[0], None
        h, self.fd_error = self.sync.average_scalars(*fd_hypergrad(val_closure, params, zs, model=self.model))
        return h, None

    def _coupled_gradients(self, param_groups, params, grads) -> list[Optional[Tensor]]:
        """g + wd w (SPEC section 2, step 1: coupled L2 for sgd, sgdm, adam; adamw: g)."""
        wd = {id(p): self.config.group_options(g["weight_decay"]).coupled_weight_decay
              for g in param_groups for p in g["params"]}
        return [g if g is None or not wd[id(p)] else g + wd[id(p)] * p.detach()
                for p, g in zip(params, grads)]

    def _dot_val_train(self, grad_e, grads) -> Tensor:
        """<clip(grad E), clip(g + wd w_t)>, the evidence auto-mu weighs against eta."""
        pairs = [(ge, g) for ge, g in zip(grad_e, grads) if ge is not None and g is not None]
        if not pairs:
            return self.controller.zero()
        return self._sum([self.backend.clipped_dot(
            [a for a, _ in pairs], [b for _, b in pairs], clip=self.config.grad_clip, clip_b=True)])
