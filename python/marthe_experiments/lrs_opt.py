r"""LRS-OPT: the offline optimal learning-rate schedule of an unrolled SGD run.

For fixed initial weights :math:`w_0` and a fixed sequence of mini-batches, plain SGD
:math:`w_{t+1} = w_t - \eta_t \nabla L_t(w_t)` makes the validation loss after T steps a
function :math:`E(\eta_0, \dots, \eta_{T-1}) = L_{val}(w_T)`. LRS-OPT minimises it over
:math:`\eta \ge 0` by projected gradient descent with the exact hypergradient.

Exact hypergradient, reverse mode. With :math:`p_T = \nabla L_{val}(w_T)` and, going back,

.. math::
    \partial E / \partial \eta_t = -\langle p_{t+1}, \nabla L_t(w_t) \rangle, \qquad
    p_t = p_{t+1} - \eta_t H_t(w_t)\, p_{t+1},

each backward step costs one gradient with ``create_graph`` and one Hessian-vector product
(double backward) at :math:`w_t`. Forward mode would need one tangent per learning rate
(T = 512 of them, each as large as the weights), so reverse mode it is; its price is the
trajectory :math:`w_0, \dots, w_{T-1}`. ``checkpoint_every = k`` keeps every k-th state and
recomputes the others segment by segment in the backward pass: memory
:math:`(\lceil T/k \rceil + k)` weight copies for one extra forward pass; ``k = 1`` stores
all T states and recomputes nothing (the default while that fits in ``memory_limit``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm


@dataclass
class Trajectory:
    """One forward unroll: E(w_T), and the stored states the backward pass starts from."""

    etas: Tensor
    E: float
    w_final: list
    checkpoints: dict


class Unroll:
    """The map eta -> E(w_T(eta)) and its exact gradient, for a buffer-free model."""

    def __init__(self, model: nn.Module, w0: Sequence[Tensor], x: Tensor, y: Tensor, batches: Tensor,
                 x_val: Tensor, y_val: Tensor, checkpoint_every: Optional[int] = None,
                 memory_limit: float = 4 * 2 ** 30, progress: bool = False):
        if any(True for _ in model.buffers()):
            raise ValueError("LRS-OPT needs a model without buffers (no BatchNorm): the unrolled "
                             "map must depend on the weights and the learning rates only")
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.w0 = [w.detach().clone() for w in w0]
        if len(self.w0) != len(self.names):
            raise ValueError(f"w0 has {len(self.w0)} tensors, the model has {len(self.names)} parameters")
        self.x, self.y, self.batches = x, y, batches
        self.x_val, self.y_val = x_val, y_val
        self.T = len(batches)
        snapshot = sum(w.numel() * w.element_size() for w in self.w0)
        if checkpoint_every is None:
            checkpoint_every = 1 if self.T * snapshot <= memory_limit else max(1, math.isqrt(self.T))
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.k = checkpoint_every
        self.snapshot_bytes = snapshot
        self.progress = progress

    @property
    def stored_bytes(self) -> int:
        """Weight copies held at the peak of a backward pass."""
        held = math.ceil(self.T / self.k) + (self.k if self.k > 1 else 0)
        return held * self.snapshot_bytes

    def _loss(self, w: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(self.model, dict(zip(self.names, w)), (x,)), y)

    def _train_loss(self, w, t: int) -> Tensor:
        idx = self.batches[t]
        return self._loss(w, self.x[idx], self.y[idx])

    def _sgd_step_(self, w: list, t: int, eta: float) -> None:
        with torch.enable_grad():
            leaves = [v.detach().requires_grad_() for v in w]
            grads = torch.autograd.grad(self._train_loss(leaves, t), leaves)
        with torch.no_grad():
            torch._foreach_add_(w, grads, alpha=-eta)

    def validation_loss(self, w: Sequence[Tensor]) -> float:
        with torch.no_grad():
            return float(self._loss(w, self.x_val, self.y_val))

    def forward(self, etas: Tensor) -> Trajectory:
        """Run the T SGD steps with learning rates ``etas``; keep every k-th state."""
        etas = self._check(etas)
        w = [v.clone() for v in self.w0]
        ckpts = {}
        for t in tqdm(range(self.T), desc="LRS-OPT forward", disable=not self.progress, leave=False):
            if t % self.k == 0:
                ckpts[t] = [v.clone() for v in w]
            self._sgd_step_(w, t, float(etas[t]))
        return Trajectory(etas.clone(), self.validation_loss(w), w, ckpts)

    def backward(self, traj: Trajectory) -> Tensor:
        """dE/deta (float64, length T) for the trajectory ``forward`` returned."""
        etas = traj.etas
        with torch.enable_grad():
            leaves = [v.detach().requires_grad_() for v in traj.w_final]
            p = list(torch.autograd.grad(self._loss(leaves, self.x_val, self.y_val), leaves))
        grad = torch.zeros(self.T, dtype=torch.float64)
        bar = tqdm(total=self.T, desc="LRS-OPT backward", disable=not self.progress, leave=False)
        for start in reversed(range(0, self.T, self.k)):
            states = [traj.checkpoints[start]]
            for t in range(start, min(start + self.k, self.T) - 1):
                nxt = [v.clone() for v in states[-1]]
                self._sgd_step_(nxt, t, float(etas[t]))
                states.append(nxt)
            for t in reversed(range(start, start + len(states))):
                eta = float(etas[t])
                with torch.enable_grad():
                    leaves = [v.detach().requires_grad_() for v in states[t - start]]
                    g = torch.autograd.grad(self._train_loss(leaves, t), leaves, create_graph=eta != 0.0)
                    dot = sum((gi * pi).sum() for gi, pi in zip(g, p))
                    grad[t] = -float(dot.detach().double())
                    if eta != 0.0:
                        hp = torch.autograd.grad(dot, leaves)
                        with torch.no_grad():
                            torch._foreach_add_(p, hp, alpha=-eta)
                bar.update(1)
            states.clear()
        bar.close()
        return grad

    def value_and_grad(self, etas: Tensor) -> tuple[float, Tensor]:
        traj = self.forward(etas)
        return traj.E, self.backward(traj)

    def _check(self, etas: Tensor) -> Tensor:
        etas = torch.as_tensor(etas, dtype=torch.float64).detach().cpu()
        if etas.shape != (self.T,):
            raise ValueError(f"need {self.T} learning rates, got shape {tuple(etas.shape)}")
        if not torch.isfinite(etas).all() or (etas < 0).any():
            raise ValueError("learning rates must be finite and >= 0")
        return etas


@dataclass
class LrsOptResult:
    etas: Tensor                                      # the optimised schedule
    E_history: list = field(default_factory=list)    # E after each accepted outer iteration (index 0: start)
    step_history: list = field(default_factory=list)  # outer step size used at each accepted iteration
    seconds: list = field(default_factory=list)       # wall time of each outer iteration
    forward_passes: int = 0
    backward_passes: int = 0
    stopped: str = ""                                 # why it stopped early, if it did


OUTER_METHODS = ("gd", "rms")


def optimise_schedule(unroll: Unroll, etas0: Tensor, iterations: int, method: str = "gd",
                      first_step: float = 1.0, grow: float = 1.5, shrink: float = 0.5,
                      armijo: float = 1e-4, max_backtracks: int = 12, rms_decay: float = 0.9,
                      progress: bool = True) -> LrsOptResult:
    """Projected descent on eta >= 0 with an Armijo backtracking line search.

    ``method="gd"``: plain projected gradient descent, direction ``-grad``. ``"rms"``:
    the gradient divided elementwise by the root of its running mean square (RMSprop's
    diagonal preconditioner, bias-corrected). A positive diagonal scaling keeps it a
    descent direction, so the line search still guarantees that E never increases, while
    the hypergradient's very uneven scale across the T steps no longer confines the
    progress to the few most sensitive steps.

    The first step moves the learning rate with the largest direction entry by
    ``first_step * max(eta0)``; afterwards the step grows by ``grow`` after an accepted
    iteration and shrinks by ``shrink`` per rejected trial.
    Every trial costs one forward unroll; every accepted iteration one backward pass.
    """
    if method not in OUTER_METHODS:
        raise ValueError(f"method must be one of {OUTER_METHODS}, got {method!r}")
    etas = unroll._check(etas0)
    traj = unroll.forward(etas)
    result = LrsOptResult(etas=etas.clone(), E_history=[traj.E], forward_passes=1)
    if not math.isfinite(traj.E):
        result.stopped = "E is not finite at the initial schedule"
        return result
    alpha = None
    mean_square = torch.zeros_like(etas)
    bar = tqdm(range(iterations), desc="LRS-OPT", disable=not progress)
    for it in bar:
        started = time.perf_counter()
        grad = unroll.backward(traj)
        result.backward_passes += 1
        if not bool(grad.any()):
            result.stopped = "zero hypergradient"
            break
        direction = grad
        if method == "rms":
            mean_square.mul_(rms_decay).add_(grad * grad, alpha=1 - rms_decay)
            rms = (mean_square / (1 - rms_decay ** (it + 1))).sqrt()
            direction = grad / (rms + 1e-12 * float(rms.max()))
        if alpha is None:
            alpha = first_step * max(float(etas.max()), 1e-12) / float(direction.abs().max())
        for _ in range(max_backtracks):
            cand = torch.clamp(etas - alpha * direction, min=0.0)
            change = cand - etas
            if not bool(change.any()):
                result.stopped = "projected step is zero (stationary point)"
                break
            trial = unroll.forward(cand)
            result.forward_passes += 1
            if math.isfinite(trial.E) and trial.E <= traj.E + armijo * float(grad @ change):
                break
            alpha *= shrink
        else:
            result.stopped = f"no decrease after {max_backtracks} backtracking trials"
        if result.stopped:
            break
        result.step_history.append(alpha)
        etas, traj = cand, trial
        alpha *= grow
        result.E_history.append(traj.E)
        result.seconds.append(time.perf_counter() - started)
        bar.set_postfix(E=f"{traj.E:.4f}", refresh=False)
    bar.close()
    result.etas = etas.clone()
    return result
