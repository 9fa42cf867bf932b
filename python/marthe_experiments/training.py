"""Mini-batches, evaluation and the training loop every experiment shares."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import marthe_ext

from . import parallel
from .methods import Trainer, has_batchnorm


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> Tensor:
    """(steps, batch_size) example indices: seeded reshuffles each epoch, last partial batch dropped."""
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} is larger than the {n} training examples")
    per_epoch = n // batch_size
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps / per_epoch)
    rows = [torch.randperm(n, generator=gen)[:per_epoch * batch_size].view(per_epoch, batch_size)
            for _ in range(epochs)]
    return torch.cat(rows)[:steps]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in its current mode, batched to bound memory."""
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        total_loss += float(F.cross_entropy(out.double(), y[i:i + batch_size], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return total_loss / len(x), correct / len(x)


@dataclass
class RunLog:
    """What one training run recorded."""

    lrs: list = field(default_factory=list)          # eta used at each step
    train_loss: list = field(default_factory=list)   # training minibatch loss at each step
    eval_steps: list = field(default_factory=list)   # steps at which the validation set was evaluated
    val_loss: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    epoch_times: list = field(default_factory=list)  # seconds of training per epoch (no evaluation)
    diverged_at: Optional[int] = None
    skipped_steps: int = 0


def train_run(trainer: Trainer, x: Tensor, y: Tensor, batches: Tensor, *,
              val_batch: Optional[Callable[[int], tuple[Tensor, Tensor]]],
              evaluator: Callable[[], tuple[float, float]],
              eval_every: int, steps_per_epoch: Optional[int] = None,
              progress: bool = True, desc: str = "", val_bn: str = "train") -> RunLog:
    """Run ``len(batches)`` steps of ``trainer`` on (x, y).

    ``val_batch(t)`` gives the validation examples the hypergradient methods use at step t
    (None: they use the training loss, HD style); with BatchNorm, ``val_bn`` says how that
    validation loss normalises: "train" (batch statistics, running ones left unchanged) or
    "eval" (the running statistics, as ``evaluator`` sees them). ``evaluator()`` returns (val loss, val
    acc) and is called with the trainer's evaluation weights every ``eval_every`` steps
    and at the end. A non-finite training loss stops the run (``diverged_at``).
    """
    model = trainer.model
    log = RunLog()
    steps = len(batches)
    bn = has_batchnorm(model)
    uses_val = trainer.family in ("HD", "RTHO", "MARTHE") and val_batch is not None

    def record_eval(step: int) -> None:
        with trainer.evaluation(recalibrate=lambda: recalibrate_bn(model, x, batches[:BN_REFRESH_BATCHES])):
            loss, acc = evaluator()
        log.eval_steps.append(step)
        log.val_loss.append(loss)
        log.val_acc.append(acc)

    model.train()
    record_eval(0)
    train_time = 0.0
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for t in bar:
        started = time.perf_counter()
        idx = parallel.shard(batches[t])  # this rank's slice (all of it in one process)
        xb, yb = x[idx], y[idx]

        def train_loss() -> Tensor:
            return F.cross_entropy(model(xb), yb)

        val_loss = _val_closure(model, *val_batch(t), bn, val_bn) if uses_val else None
        log.lrs.append(trainer.lr)
        loss = trainer.step(train_loss, val_loss)
        log.train_loss.append(loss)
        done = t + 1
        if steps_per_epoch and done % steps_per_epoch == 0:
            trainer.end_epoch()
        train_time += time.perf_counter() - started
        if not math.isfinite(loss):
            log.diverged_at = t
            break
        if steps_per_epoch and done % steps_per_epoch == 0:
            log.epoch_times.append(train_time)
            train_time = 0.0
        if done % eval_every == 0 or done == steps:
            record_eval(done)
        if progress and done % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{log.lrs[-1]:.3g}", refresh=False)
    bar.close()
    log.skipped_steps = trainer.skipped_steps
    if log.diverged_at is not None:
        log.eval_steps.append(log.diverged_at + 1)
        log.val_loss.append(math.inf)
        log.val_acc.append(float("nan"))
    return log


def _val_closure(model: nn.Module, xv: Tensor, yv: Tensor, bn: bool, val_bn: str = "train") -> Callable[[], Tensor]:
    if val_bn not in ("train", "eval"):
        raise ValueError(f"val_bn must be 'train' or 'eval', got {val_bn!r}")

    def val_loss() -> Tensor:
        if not bn:
            return F.cross_entropy(model(xv), yv)
        if val_bn == "eval":
            model.eval()
            try:
                return F.cross_entropy(model(xv), yv)
            finally:
                model.train()
        with marthe_ext.preserved_buffers(model):
            return F.cross_entropy(model(xv), yv)

    return val_loss


# How many training batches refresh BatchNorm statistics before a schedule-free average (or
# any weights not trained at as they are) is evaluated.
BN_REFRESH_BATCHES = 8


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: Tensor, batches: Tensor) -> None:
    """Forward passes in train mode refresh BatchNorm running statistics for the current weights."""
    for idx in batches:
        model(x[idx])
