"""marthe_ext: online learning-rate scheduling by hypergradients (MARTHE, HD, RTHO), fast.

    import marthe_ext
    opt = marthe_ext.Marthe(model.parameters(), lr=0.01, dynamics="sgdm", mu=0.99)
    loss = opt.step(lambda: loss_fn(model(x), y), val_closure=lambda: loss_fn(model(xv), yv))
"""
from .backends import BACKENDS, BackendUnavailable, select_backend
from .hvp import preserved_buffers
from .optimizer import HD, RTHO, Marthe

__version__ = "0.1.0"

__all__ = ["Marthe", "HD", "RTHO", "preserved_buffers", "BACKENDS", "BackendUnavailable", "select_backend",
           "__version__"]
