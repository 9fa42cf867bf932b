"""Crash-safe training checkpoints: atomic writes, verified loads, ``weights_only=True``.

``save`` writes the model's and the optimizer's state dicts (and any extra entries: the
step, RNG states) to a temporary file in the destination's folder, flushes it to disk
and renames it over the destination (``os.replace`` is atomic): a process killed at any
instant leaves either the previous checkpoint or the new one, never a torn file. The
file is a plain ``torch.save`` archive, so ``torch.load(path, weights_only=True)`` reads
it; like any ``tempfile.mkstemp`` file it is readable by its owner only. It carries a
SHA-256 digest of its contents, because a torch archive does not detect flipped bytes in
tensor data (measured: torch.load returns the altered tensor without a word).

``load`` reads with ``weights_only=True`` (no code from the file runs), checks the
format, the digest and that the model's and the optimizer's entries fit, and only then
changes the model and the optimizer: a truncated, corrupted or foreign file raises
``CheckpointError`` and leaves both as they were.

    checkpoint.save("run/last.pt", model=model, optimizer=opt, step=step,
                    rng=torch.get_rng_state())
    extra = checkpoint.load("run/last.pt", model=model, optimizer=opt)
    step = extra["step"]; torch.set_rng_state(extra["rng"])
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

FORMAT = "marthe_ext.checkpoint"
VERSION = 1
_RESERVED = ("model", "optimizer")
# What torch.load(weights_only=True) restores, besides tensors and containers.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: truncated, corrupted, foreign or mismatched."""


def save(path: PathLike, *, model: Optional[nn.Module] = None,
         optimizer: Optional[torch.optim.Optimizer] = None, **extra: Any) -> None:
    """Write a checkpoint atomically. ``extra`` values may be tensors, numbers, strings,
    dtypes, devices and dicts/lists/tuples of these (what ``weights_only`` loads)."""
    data = dict(extra)
    if model is not None:
        data["model"] = model.state_dict()
    if optimizer is not None:
        data["optimizer"] = optimizer.state_dict()
    record = {"format": FORMAT, "version": VERSION, "sha256": _digest(data), "data": data}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut


def load(path: PathLike, *, model: Optional[nn.Module] = None,
         optimizer: Optional[torch.optim.Optimizer] = None,
         map_location: Any = "cpu") -> dict:
    """Verify a checkpoint, then load it into ``model`` and ``optimizer`` (each optional).

    Returns the extra entries given to ``save``. Raises ``CheckpointError`` (nothing
    changed) when the file is unreadable, not a checkpoint of this module, fails its
    digest, or does not fit the model or the optimizer.
    """
    data = read(path, map_location=map_location)
    if model is not None:
        _check_model(model, data, path)
    if optimizer is not None:
        if "optimizer" not in data:
            raise CheckpointError(f"{path}: the checkpoint holds no optimizer state")
        before = optimizer.state_dict()
        try:
            # Marthe.load_state_dict (like torch's) checks everything before changing anything.
            optimizer.load_state_dict(data["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit: {e}") from e
    if model is not None:
        try:
            model.load_state_dict(data["model"])
        except BaseException:
            if optimizer is not None:
                optimizer.load_state_dict(before)
            raise
    return {k: v for k, v in data.items() if k not in _RESERVED}


def read(path: PathLike, map_location: Any = "cpu") -> dict:
    """The verified contents of a checkpoint (``model``, ``optimizer``, extra entries)."""
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupted, or "
                              f"not a torch.save file with only tensors and plain data): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        keys = sorted(map(str, record))[:8] if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(f"{path}: not a marthe_ext checkpoint (found {keys}); write "
                              f"checkpoints with marthe_ext.checkpoint.save")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {record.get('version')!r}, "
                              f"this marthe_ext reads version {VERSION}")
    data = record.get("data")
    if not isinstance(data, dict) or _digest(data, strict=False) != record.get("sha256"):
        raise CheckpointError(f"{path}: checkpoint corrupted: its contents do not match the "
                              f"SHA-256 digest written with them")
    return data


def _check_model(model: nn.Module, data: dict, path) -> None:
    """The saved model entries have the model's keys and shapes (before anything changes)."""
    saved = data.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: the checkpoint holds no model state")
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: the model does not fit: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, t in own.items():
        s = saved[k]
        if not isinstance(s, Tensor) or s.shape != t.shape:
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise CheckpointError(f"{path}: model entry {k!r} has shape {shape} in the "
                                  f"checkpoint and {tuple(t.shape)} in the model")


def _digest(obj: Any, strict: bool = True) -> str:
    """SHA-256 over a canonical walk of the contents: types, shapes and every byte.

    ``strict`` (on save) rejects values that ``weights_only=True`` could not load back."""
    h = hashlib.sha256()

    def feed(x, where):
        if isinstance(x, Tensor):
            x = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{x.dtype}{x.numel()};".encode())
            h.update(x.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)};".encode())
            for k, v in x.items():
                feed(k, where)
                feed(v, f"{where}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__}{len(x)};".encode())
            for i, v in enumerate(x):
                feed(v, f"{where}[{i}]")
        elif isinstance(x, _PLAIN) or not strict:
            h.update(f"{type(x).__name__}:{x!r};".encode())
        else:
            raise TypeError(f"checkpoint entry {where} is a {type(x).__name__}: only tensors, "
                            f"numbers, strings, dtypes, devices and dicts/lists/tuples of "
                            f"them load back with weights_only=True")

    feed(obj, "checkpoint")
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = ["CheckpointError", "FORMAT", "VERSION", "load", "read", "save"]
