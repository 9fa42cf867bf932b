"""Loading the compiled extensions: the installed build, else a JIT build, else a clear error.

``load_extension("cpu")`` returns the pybind11 module of the CPU backend (``"cuda"``: the
CUDA backend). In order:

1. the module built by ``pip install --no-build-isolation .`` (``marthe_ext._C_cpu``);
2. if ``allow_jit``: a build on first use with ``torch.utils.cpp_extension.load`` (ninja),
   cached per user under ``$TORCH_EXTENSIONS_DIR/marthe_ext-<uid>`` or
   ``~/.cache/marthe_ext-<uid>`` per Python and torch version, so later processes load it
   in a second. The cache's folders are created private (0700); a cache folder or built
   library that another user owns or that anyone may write is refused (a library a
   stranger could have planted there would run as this user);
3. otherwise :class:`ExtensionUnavailable`, saying why and which backend to use instead.

Failures are remembered with their reason (:func:`unavailable_reason`), so a failed JIT build
is not retried in every call. Nothing here queries CUDA: importing this module is free.
The JIT build runs in a child process and changes nothing in this one (not even ``PATH``).
``MARTHE_EXT_VERBOSE=1`` shows the compiler commands of a JIT build; ``MAX_JOBS`` bounds
its parallel jobs; ``CXX`` picks the C++ compiler.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
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


def _uid() -> Optional[int]:
    return os.getuid() if hasattr(os, "getuid") else None  # no owners to check on Windows


def cache_root() -> Path:
    """The per-user root of the JIT build cache (a shared $TORCH_EXTENSIONS_DIR included)."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    parent = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME")
                                          or Path.home() / ".cache")
    uid = _uid()
    return parent / ("marthe_ext" if uid is None else f"marthe_ext-{uid}")


def cache_dir(kind: str) -> Path:
    """Where JIT builds of ``kind`` live: one folder per user, Python and torch version."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    return cache_root() / tag.replace("+", "_") / kind


class UnsafeCache(OSError):
    """A cache folder or file another user owns or anyone may write: not loaded from."""


def _check_owned(path: Path) -> None:
    """``path`` (and, if it is a link, the link itself) is ours and not world-writable."""
    uid = _uid()
    link, target = os.lstat(path), os.stat(path)
    for st in (link, target) if stat.S_ISLNK(link.st_mode) else (target,):
        if uid is not None and st.st_uid != uid:
            raise UnsafeCache(f"{path} is owned by uid {st.st_uid}, not by this user "
                              f"(uid {uid}); remove it or set TORCH_EXTENSIONS_DIR")
    if target.st_mode & stat.S_IWOTH:
        raise UnsafeCache(f"{path} is world-writable (mode {stat.filemode(target.st_mode)}): "
                          f"anyone could plant a library there; chmod o-w it, remove it, "
                          f"or set TORCH_EXTENSIONS_DIR")


def secure_cache_dir(kind: str) -> Path:
    """``cache_dir(kind)``, created private (0700) where missing, every level from the
    per-user root down checked with ``_check_owned``. Raises ``UnsafeCache``."""
    target = cache_dir(kind)
    root = cache_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    level = root
    for part in (None, *target.relative_to(root).parts):
        if part is not None:
            level = level / part
        with contextlib.suppress(FileExistsError):
            level.mkdir(mode=0o700)
        _check_owned(level)
    return target


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


class _BuildFailed(RuntimeError):
    """The child process building an extension failed; the message ends with its output."""


# torch's cpp_extension runs ninja found on PATH only. The build runs in a child process
# whose PATH has the ninja wheel's folder, so that this process's PATH (shared by every
# thread, inherited by whatever it spawns meanwhile) is never edited.
_BUILD_SCRIPT = (
    "import json, sys\n"
    "from torch.utils import cpp_extension\n"
    "cpp_extension.load(**json.loads(sys.argv[1]))\n"
)
_OUTPUT_TAIL = 4000  # characters of the build log kept in the error


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    ninja_dir = _ninja_dir()
    if ninja_dir:
        env["PATH"] = ninja_dir + os.pathsep + env.get("PATH", "")
    # The child must build against the torch this process runs, wherever it was found.
    torch_root = str(Path(torch.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (torch_root, env.get("PYTHONPATH")) if p)
    return env


def _import_built(name: str, build_dir: Path) -> ModuleType:
    """Import the library the child built (what cpp_extension.load does after building)."""
    path = build_dir / (name + (".pyd" if sys.platform == "win32" else ".so"))
    _check_owned(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"the JIT build left no loadable module at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jit_build(kind: str) -> ModuleType:
    root = source_root()
    sources = cfg.CPU_SOURCES if kind == "cpu" else cfg.CUDA_SOURCES
    build_dir = secure_cache_dir(kind)
    verbose = os.environ.get("MARTHE_EXT_VERBOSE") == "1"
    kwargs = dict(
        name=cfg.JIT_PREFIX + cfg.MODULES[kind],
        sources=[str(root / s) for s in sources],
        extra_include_paths=[str(root)],
        build_directory=str(build_dir),
        verbose=verbose,
    )
    if kind == "cpu":
        kwargs.update(extra_cflags=list(cfg.CPU_CFLAGS), extra_ldflags=list(cfg.CPU_LDFLAGS))
    else:
        kwargs.update(extra_cflags=list(cfg.CUDA_CFLAGS), extra_cuda_cflags=list(cfg.NVCC_FLAGS))
    # Verbose: the compiler commands go to this process's terminal as they run.
    capture = {} if verbose else dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(kwargs)],
                          env=_build_env(), check=False, **capture)
    if done.returncode != 0:
        log = ("see its output above" if verbose
               else (done.stdout or "").strip()[-_OUTPUT_TAIL:] or "it printed nothing")
        raise _BuildFailed(f"the build process exited with status {done.returncode}: {log}")
    return _import_built(kwargs["name"], build_dir)


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
        except UnsafeCache as exc:
            # Not remembered: the user can fix the folder and retry in the same process.
            raise _fail(kind, f"{prebuilt}; refusing the JIT build cache: {exc}") from exc
        except (_BuildFailed, OSError, ImportError) as exc:  # keep the log for the user
            _jit_failed[kind] = f"{prebuilt}; the JIT build failed: {type(exc).__name__}: {exc}"
            raise _fail(kind, _jit_failed[kind]) from exc
        _jit_modules[kind] = module
        _reasons.pop(kind, None)
        return module


__all__ = ["ExtensionUnavailable", "KINDS", "UnsafeCache", "cache_dir", "cache_root",
           "load_extension", "secure_cache_dir", "source_root", "unavailable_reason"]
