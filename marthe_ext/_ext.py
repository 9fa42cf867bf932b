"""Loading the compiled extensions: the installed build, else a JIT build, else a clear error.

``load_extension("cpu")`` returns the pybind11 module of the CPU backend (``"cuda"``: the
CUDA backend). In order:

1. the module built by ``pip install --no-build-isolation .`` (``marthe_ext._C_cpu``);
2. if ``allow_jit``: a build on first use with ``torch.utils.cpp_extension.load`` (ninja),
   cached under ``$TORCH_EXTENSIONS_DIR/marthe_ext`` or ``~/.cache/marthe_ext`` per Python
   and torch version, so later processes load it in a second;
3. otherwise :class:`ExtensionUnavailable`, saying why and which backend to use instead.

Failures are remembered with their reason (:func:`unavailable_reason`), so a failed JIT build
is not retried in every call. Nothing here queries CUDA: importing this module is free.
``MARTHE_EXT_VERBOSE=1`` shows the compiler commands of a JIT build; ``MAX_JOBS`` bounds
its parallel jobs; ``CXX`` picks the C++ compiler.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from . import _build_config as cfg

KINDS = ("cpu", "cuda")


class ExtensionUnavailable(RuntimeError):
    """A compiled extension cannot be loaded here; the message says why and what to use."""


_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}  # installed (prebuilt) builds
_jit_modules: dict[str, ModuleType] = {}  # built on first use in this process
_reasons: dict[str, str] = {}  # kind -> why the last attempt failed
_jit_failed: dict[str, str] = {}  # kind -> why the JIT build failed (not retried)


def source_root() -> Optional[Path]:
    """The C++/CUDA sources: shipped in the package, else the checkout's ``csrc/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "marthe_math.h").is_file():
            return candidate
    return None


def cache_dir(kind: str) -> Path:
    """Where JIT builds of ``kind`` live: one folder per Python and torch version."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    if base:
        root = Path(base) / "marthe_ext"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "marthe_ext"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return root / tag.replace("+", "_") / kind


def unavailable_reason(kind: str) -> Optional[str]:
    """Why the last attempt to load ``kind`` failed, or None."""
    return _reasons.get(kind)


def _import_prebuilt(kind: str) -> ModuleType:
    return importlib.import_module(f"marthe_ext.{cfg.MODULES[kind]}")


def _ninja_dir() -> Optional[str]:
    """The folder of a ninja binary not on PATH (the ``ninja`` wheel in a venv not activated)."""
    if shutil.which("ninja"):
        return None
    try:
        import ninja  # the PyPI wheel ships the binary

        return getattr(ninja, "BIN_DIR", None)
    except ImportError:
        return None


def _jit_preconditions(kind: str) -> Optional[str]:
    if kind == "cuda" and torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX)"
    if source_root() is None:
        return "the C++ sources (csrc/) are not shipped with this installation"
    if _ninja_dir() is None and shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    if kind == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return "no CUDA toolkit found (nvcc; set CUDA_HOME)"
    return None


def _jit_build(kind: str) -> ModuleType:
    from torch.utils import cpp_extension

    root = source_root()
    sources = cfg.CPU_SOURCES if kind == "cpu" else cfg.CUDA_SOURCES
    build_dir = cache_dir(kind)
    build_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        name=cfg.JIT_PREFIX + cfg.MODULES[kind],
        sources=[str(root / s) for s in sources],
        extra_include_paths=[str(root)],
        build_directory=str(build_dir),
        verbose=os.environ.get("MARTHE_EXT_VERBOSE") == "1",
    )
    if kind == "cpu":
        kwargs.update(extra_cflags=list(cfg.CPU_CFLAGS), extra_ldflags=list(cfg.CPU_LDFLAGS))
    else:
        kwargs.update(extra_cflags=list(cfg.CUDA_CFLAGS), extra_cuda_cflags=list(cfg.NVCC_FLAGS))
    ninja_dir = _ninja_dir()
    old_path = os.environ.get("PATH", "")
    if ninja_dir:
        os.environ["PATH"] = ninja_dir + os.pathsep + old_path
    try:
        return cpp_extension.load(**kwargs)
    finally:
        if ninja_dir:
            os.environ["PATH"] = old_path


def _fail(kind: str, reason: str) -> ExtensionUnavailable:
    _reasons[kind] = reason
    return ExtensionUnavailable(
        f"the compiled {kind} extension of marthe_ext is unavailable: {reason}. "
        f"Use backend='torch' (always available)"
        + (" or backend='triton'" if kind == "cuda" else "")
        + "."
    )


def load_extension(kind: str, allow_jit: bool = True) -> ModuleType:
    """The pybind11 module of the ``kind`` backend ("cpu" or "cuda"); see the module doc."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with _lock:
        if kind in _modules:
            return _modules[kind]
        # An explicit request may have JIT-built the module in this process; "auto" still
        # ignores it, so that what "auto" picks does not depend on the process's history.
        if allow_jit and kind in _jit_modules:
            return _jit_modules[kind]
        try:
            module = _import_prebuilt(kind)
        except ImportError as exc:
            prebuilt = f"no installed build ({type(exc).__name__}: {exc})"
        else:
            _modules[kind] = module
            _reasons.pop(kind, None)
            return module
        if not allow_jit:
            raise _fail(
                kind,
                f"{prebuilt}; building on first use is off here (backend='auto' never "
                f"compiles; request backend='{kind}' to build it, or install with "
                f"`pip install --no-build-isolation .`)",
            )
        if kind in _jit_failed:
            raise _fail(kind, _jit_failed[kind])
        missing = _jit_preconditions(kind)
        if missing is not None:
            _jit_failed[kind] = f"{prebuilt}; cannot build it: {missing}"
            raise _fail(kind, _jit_failed[kind])
        try:
            module = _jit_build(kind)
        except Exception as exc:  # compiler or linker error: keep the log for the user
            _jit_failed[kind] = f"{prebuilt}; the JIT build failed: {type(exc).__name__}: {exc}"
            raise _fail(kind, _jit_failed[kind]) from exc
        _jit_modules[kind] = module
        _reasons.pop(kind, None)
        return module


__all__ = ["ExtensionUnavailable", "KINDS", "cache_dir", "load_extension", "source_root",
           "unavailable_reason"]
