"""Hugging Face ``transformers``: a ``Trainer`` that trains with ``Marthe``.

The Trainer's loop is torch's usual one: ``accelerator.backward(loss)``, gradient
clipping, ``optimizer.step()`` (no arguments), ``lr_scheduler.step()``, ``zero_grad()``.
``Marthe.step()`` without a closure takes the gradient from ``.grad`` (backward style,
``marthe_ext.training_loop``); three things the plain Trainer does not give it:

* the HVP (mu > 0, every step after the first) needs the graph of the gradient, i.e.
  ``backward(create_graph=True)``. ``MartheTrainer.training_step`` runs the Trainer's own
  training step with the accelerator's ``backward`` asked for ``create_graph=True`` (not
  needed, and not asked, with mu = 0: ``optimizers=(marthe_ext.HD(...), None)`` works
  with the plain ``Trainer``);
* the training loss, which the default's safeguard (e) ``loss_trust`` watches: the
  Trainer's step gets no arguments, so ``MartheTrainer``'s backward hands each loss it
  differentiates to ``Marthe.observe_loss`` (summed over gradient-accumulation steps, the
  loss whose gradient the step takes; with the plain ``Trainer`` (e) sees no loss and is
  inactive);
* the Trainer's default schedule (``lr_scheduler_type="linear"``, warm-up, ...) is a
  ``LambdaLR``, which would compute every step size from the LR at its construction and
  freeze MARTHE's eta. ``MartheTrainer.create_scheduler`` wraps it in
  ``marthe_ext.follow_eta``: the schedule then multiplies eta (``f = lambda(t)``). A
  scheduler passed in ``optimizers=(opt, scheduler)`` is the caller's to wrap.

Usage::

    opt = marthe_ext.Marthe(model.parameters(), lr=1e-3, dynamics="adamw", mu=0.99)
    trainer = marthe_ext.hf_trainer.MartheTrainer(
        model=model, args=TrainingArguments(..., max_grad_norm=0, lr_scheduler_type="constant"),
        train_dataset=train, optimizers=(opt, None))
    trainer.train()

What the Trainer makes impossible or different:

* the validation hypergradient: the Trainer calls ``optimizer.step()`` with no
  arguments, so the hypergradient comes from the training loss (train mode, HD-style).
  Validation mode needs a loop that passes ``val_closure`` (closure or backward style);
* ``max_grad_norm`` (on by default, 1.0) rescales ``.grad`` by its global norm before the
  step, a map MARTHE's tangent does not model; ``MartheTrainer`` refuses it: pass
  ``max_grad_norm=0`` and, if wanted, ``Marthe(grad_clip=...)`` (elementwise, applied to
  the HVP as well);
* ``gradient_accumulation_steps > 1`` works: each ``backward(create_graph=True)`` adds its
  gradient and graph, and the step takes the HVP of the summed loss;
* ``fp16=True`` uses torch's GradScaler on CUDA, whose ``unscale_`` divides ``.grad`` but
  not the graph the HVP comes from: use ``bf16=True``, or float32 with the model under
  your own float16 autocast and ``Marthe(loss_scale="dynamic")`` in closure style.
"""
from __future__ import annotations

import warnings

from transformers import Trainer

from .training_loop import follow_eta


def _marthe(optimizer):
    """The Marthe inside the Trainer's (accelerate-wrapped) optimizer, else None."""
    from .optimizer import Marthe

    while optimizer is not None and not isinstance(optimizer, Marthe):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class MartheTrainer(Trainer):
    """``transformers.Trainer`` for ``Marthe``: backward keeps the graph for the HVP and
    hands the loss to the step, the default schedule multiplies eta instead of replacing
    it, norm clipping is refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.max_grad_norm:
            raise ValueError(
                f"MartheTrainer: TrainingArguments(max_grad_norm={self.args.max_grad_norm}) rescales "
                f".grad by its global norm before the step, which MARTHE's tangent does not model; "
                f"pass max_grad_norm=0 (and Marthe(grad_clip=...) for MARTHE's elementwise clip)")
        if self.optimizer is not None and _marthe(self.optimizer) is None:
            raise TypeError(f"MartheTrainer needs a marthe_ext.Marthe optimizer: "
                            f"optimizers=(Marthe(...), None), got {type(self.optimizer).__name__}")

    def create_optimizer(self):
        if self.optimizer is None:
            raise ValueError("MartheTrainer: pass the optimizer, optimizers=(marthe_ext.Marthe(...), None)")
        return super().create_optimizer()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created:
            follow_eta(scheduler)
        return scheduler

    def training_step(self, *args, **kwargs):
        opt = _marthe(self.optimizer)
        if opt is None:
            return super().training_step(*args, **kwargs)
        accelerator = self.accelerator
        backward = accelerator.backward
        keep_graph = opt.config.mu_fixed != 0.0  # no HVP with mu = 0: a plain backward suffices

        def backward_for_marthe(loss, **kw):
            opt.observe_loss(loss)  # the step's training loss, for safeguard (e)
            if not keep_graph:
                return backward(loss, **kw)
            kw.setdefault("create_graph", True)
            with warnings.catch_warnings():
                # torch warns of the .grad <-> graph reference cycle; Marthe.step releases it.
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
                return backward(loss, **kw)

        accelerator.backward = backward_for_marthe  # this call only; the method is back after
        try:
            return super().training_step(*args, **kwargs)
        finally:
            del accelerator.backward
