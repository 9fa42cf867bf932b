"""marthe_ext: online learning-rate scheduling by hypergradients (MARTHE, HD, RTHO), fast.

    import marthe_ext
    opt = marthe_ext.Marthe(model.parameters(), lr=0.01, dynamics="sgdm", mu=0.99)
    loss = opt.step(lambda: loss_fn(model(x), y), val_closure=lambda: loss_fn(model(xv), yv))
"""
from .amp import DynamicLossScale
from .backends import BACKENDS, BackendUnavailable, select_backend
from .compiled import CompiledModelError
from .hvp import preserved_buffers
from .optimizer import HD, RTHO, Marthe
from .training_loop import follow_eta

__version__ = "0.1.0"

__all__ = ["Marthe", "HD", "RTHO", "preserved_buffers", "follow_eta", "BACKENDS", "BackendUnavailable", "select_backend",
           "DynamicLossScale", "CompiledModelError", "__version__"]
