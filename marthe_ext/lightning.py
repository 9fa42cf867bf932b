"""PyTorch Lightning: automatic optimisation with ``Marthe`` (no import of Lightning here).

Lightning's automatic loop hands the optimizer a closure that runs ``training_step``,
``zero_grad`` and ``backward`` and returns a *detached* copy of the loss: the torch
convention, where the optimizer reads ``.grad``. MARTHE's closure protocol is the other
one: the closure returns the loss with its graph, and the optimizer differentiates it
itself (the gradient, then the HVP through the same graph, or a second evaluation for
``hvp="fd"``). ``MartheAutomaticOptimization`` meets it with two public Lightning hooks:

* ``backward(loss)`` keeps the graph-attached loss instead of differentiating it;
* ``optimizer_step`` passes Lightning's closure to ``optimizer.step`` wrapped so that it
  returns that loss. The step still goes through ``LightningOptimizer.step`` and the
  precision plugin, so ``on_before_optimizer_step`` hooks, progress counters, the
  profiler and schedulers work as usual, and ``marthe_val_closure()`` adds the validation
  hypergradient.

Usage::

    class Model(marthe_ext.lightning.MartheAutomaticOptimization, L.LightningModule):
        def training_step(self, batch, batch_idx): ...    # returns the loss, as usual
        def configure_optimizers(self):
            return marthe_ext.Marthe(self.parameters(), lr=0.05, dynamics="adam", mu=0.99)
        def marthe_val_closure(self):                    # optional: validation mode
            x, y = self.val_batch()
            return lambda: F.cross_entropy(self(x), y)

The mixin must come before ``LightningModule`` in the bases. What Lightning's automatic
loop does differently with it:

* ``training_step`` runs once per evaluation the engine needs: once for "reverse" and
  "forward", twice for "fd", more on the step ``hvp="auto"`` times the engines; what it
  logs is logged each time.
* ``accumulate_grad_batches > 1`` cannot work: Lightning evaluates the accumulated
  micro-batches before the step and only asks for their gradients; MARTHE needs the
  losses (for the HVP of their sum). It raises. Use a larger batch, or manual
  optimisation with a closure that sums the micro-batch losses.
* Trainer gradient clipping (``gradient_clip_val``) clips ``.grad`` before the step, which
  MARTHE recomputes: use ``Marthe(grad_clip=...)`` (elementwise, applied to the HVP too).
* ``precision="16-mixed"`` uses torch's GradScaler, which refuses optimizer closures: use
  ``"bf16-mixed"``, or autocast to float16 inside ``training_step`` with
  ``Marthe(loss_scale="dynamic")``.

Manual optimisation needs no mixin: in ``training_step``, ``opt = self.optimizers()`` and
``opt.step(closure=lambda: loss_fn(self(x), y), val_closure=...)`` (Lightning's wrapper
passes the closure and keyword arguments through to ``Marthe.step``).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor


class MartheAutomaticOptimization:
    """LightningModule mixin: Lightning's automatic optimisation with MARTHE's closure protocol."""

    _marthe_loss: Optional[Tensor] = None

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        """Keep the loss for ``Marthe.step`` to differentiate (it takes the HVP through the
        same graph); nothing is differentiated here. In manual optimisation
        (``manual_backward``) this is Lightning's usual backward."""
        if not self.automatic_optimization:
            return super().backward(loss, *args, **kwargs)
        if self._marthe_loss is not None:
            self._marthe_loss = None
            raise RuntimeError(
                "marthe_ext: a second loss arrived before the optimizer step: Lightning is "
                "accumulating gradients (accumulate_grad_batches > 1), which MARTHE cannot do in "
                "automatic optimisation (it needs the losses, not the gradients). Use a larger batch "
                "or manual optimisation with a closure that sums the micro-batch losses")
        self._marthe_loss = loss

    def marthe_val_closure(self) -> Optional[Callable[[], Tensor]]:
        """Override to return a validation-loss closure (MARTHE's validation mode) for this step;
        None (the default): the hypergradient comes from the training loss."""
        return None

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        if optimizer_closure is None:
            raise RuntimeError("marthe_ext: Lightning gave optimizer_step no closure to evaluate")

        def closure() -> Tensor:
            try:
                optimizer_closure()  # training_step and zero_grad; backward() above keeps the loss
            finally:
                loss, self._marthe_loss = self._marthe_loss, None
            if loss is None:
                raise RuntimeError("marthe_ext: training_step returned no loss: MARTHE has nothing "
                                   "to differentiate (skipping a step by returning None is not "
                                   "supported with MartheAutomaticOptimization)")
            return loss

        val_closure = self.marthe_val_closure()
        if val_closure is None:
            optimizer.step(closure=closure)
        else:
            optimizer.step(closure=closure, val_closure=val_closure)
