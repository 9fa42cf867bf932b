"""Backend choice, in one place.

Order: the explicit ``backend=`` argument, then the ``MARTHE_BACKEND`` environment
variable, then "auto". An explicit request that cannot be met raises with the stored
reason; "auto" falls back to the torch reference and says so once.

Every call returns a new backend instance, so per-optimizer state (the Triton backend's
pointer-table cache) is per optimizer; what is costly and shared (module imports, the
compiled extension, Triton's kernel cache) is cached by the layers below.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Callable

import torch

from .. import _ext
from .api import Backend
from .torch_ref import TorchBackend

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what to use."""


def _load_triton() -> Backend:
    return importlib.import_module("marthe_ext.backends.triton_backend").TritonBackend()


def _load_ext(kind: str, allow_jit: bool) -> Backend:
    module = importlib.import_module("marthe_ext.backends.ext_backend")
    return module.ExtBackend(kind, allow_jit=allow_jit)


_LOADERS: dict[str, Callable[[bool], Backend]] = {
    "torch": lambda allow_jit: TorchBackend(),
    "triton": lambda allow_jit: _load_triton(),
    "cuda": lambda allow_jit: _load_ext("cuda", allow_jit),
    "cpu": lambda allow_jit: _load_ext("cpu", allow_jit),
}

# Which device types each backend runs on. Triton runs on CPU tensors only under the
# interpreter (TRITON_INTERPRET=1), which is how CI tests it.
_DEVICES = {
    "torch": ("cpu", "cuda"),
    "triton": ("cuda", "cpu"),
    "cuda": ("cuda",),
    "cpu": ("cpu",),
}

# "auto" preference per device type, fastest first (see benchmarks/RESULTS.md).
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


# What "cannot run here" raises: a missing or broken install (ImportError, OSError from a
# shared library) or the extension loader's verdict (no build, failed build, stale build).
# Anything else is a bug and propagates, under "auto" too.
_UNAVAILABLE = (ImportError, OSError, _ext.ExtensionUnavailable)


def load_backend(name: str, allow_jit: bool = True) -> Backend:
    """A new instance of a named backend, or BackendUnavailable with the reason.

    ``allow_jit``: the compiled backends may build themselves with ninja on first use
    (explicit requests); "auto" passes False and takes only an installed build.
    """
    if name not in _LOADERS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    try:
        return _LOADERS[name](allow_jit)
    except _UNAVAILABLE as exc:  # keep the reason for the user
        raise BackendUnavailable(
            f"backend {name!r} is unavailable: {type(exc).__name__}: {exc}. "
            f"Use backend='torch' (always available) or 'auto'."
        ) from exc


def _triton_allowed_on(device_type: str) -> bool:
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(device_type: str, reasons: str) -> None:
    warnings.warn(
        f"marthe_ext: no fast backend for {device_type} tensors, using 'torch' ({reasons})",
        RuntimeWarning,
        stacklevel=4,
    )


def select_backend(requested: str, device: torch.device) -> Backend:
    """Resolve ``requested`` (argument, else $MARTHE_BACKEND, else auto) for ``device``.

    Returns a new instance: call it once per optimizer and keep the result."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        requested = os.environ.get("MARTHE_BACKEND", "auto")
        if requested not in BACKENDS:
            raise ValueError(
                f"MARTHE_BACKEND must be one of {BACKENDS}, got {requested!r}")
    dev = device.type
    if requested != "auto":
        if dev not in _DEVICES[requested] or (requested == "triton" and not _triton_allowed_on(dev)):
            raise BackendUnavailable(
                f"backend {requested!r} does not run on {dev} tensors"
                + (" (set TRITON_INTERPRET=1 to run Triton on the CPU)" if requested == "triton" else "")
            )
        return load_backend(requested)
    reasons = []
    for name in _AUTO_ORDER.get(dev, ("torch",)):
        if name == "torch":
            if reasons:
                _warn_fallback_once(dev, "; ".join(reasons))
            return load_backend("torch")
        try:
            return load_backend(name, allow_jit=False)
        except BackendUnavailable as exc:
            reasons.append(str(exc).split(". Use")[0])
    return load_backend("torch")


__all__ = ["Backend", "BackendUnavailable", "BACKENDS", "load_backend", "select_backend"]
