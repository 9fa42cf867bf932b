"""Host side of the multi-tensor layout: pointer tables and chunk tables, cached.

A *row* is one tensor list's ``data_ptr()``s as an int64 device tensor; a *layout* is
the chunk table of a list of sizes. Both are cached by value (addresses, dtype and, for
the lists that can change between steps, sizes), so a training loop whose parameters,
state and tangents keep their storage builds them once, and a list whose tensors move
(fresh gradients every step) only costs a new row when its addresses were not seen
recently. A table holds nothing but addresses and sizes, so a cached one is right
whenever its key matches. Tensors are never copied.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Row:
    """One tensor list as the kernels see it."""

    ptrs: Tensor            # int64 data_ptrs on the device
    numels: tuple[int, ...]
    dtype: torch.dtype
    aligned: bool           # every address is a multiple of 16 bytes


@dataclass(frozen=True)
class Layout:
    """Chunk tables for a list of sizes: one program per (tensor index, first element)."""

    numels: Tensor  # int64 (n_tensors,)
    full: Tensor    # int64 (n_full, 2): chunks wholly inside their tensor
    tail: Tensor    # int64 (n_tail, 2): the last, partial chunk of a tensor

    @property
    def n_chunks(self) -> int:
        return self.full.shape[0] + self.tail.shape[0]


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return host
    # Pinned source + non_blocking: the copy is queued on the current stream, no host wait.
    return host.pin_memory().to(device, non_blocking=True)


def check_contiguous(tensors: Sequence[Tensor], what: str) -> None:
    if not all(map(Tensor.is_contiguous, tensors)):
        i, t = next((i, t) for i, t in enumerate(tensors) if not t.is_contiguous())
        raise ValueError(
            f"triton backend: {what}[{i}] is not contiguous (shape {tuple(t.shape)}, "
            f"stride {t.stride()}); the multi-tensor kernels address each tensor as one "
            f"flat block. Pass contiguous tensors or use backend='torch'.")


class TableCache:
    """Least-recently-used caches of rows, layouts and constant tensors, bounded in entries.

    Safe to share between threads: lookups and insertions hold a lock (another thread could
    otherwise evict a key between its lookup and its move to the recent end). Tables are
    built outside the lock; two threads missing the same key both build it, harmlessly.
    """

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.builds = 0  # tables built so far (cache misses); tests and benchmarks read it
        self._lock = threading.Lock()
        self._rows: OrderedDict[Hashable, Row] = OrderedDict()
        self._layouts: OrderedDict[Hashable, Layout] = OrderedDict()
        self._consts: OrderedDict[Hashable, Tensor] = OrderedDict()

    def _get(self, cache: OrderedDict, key: Hashable):
        with self._lock:
            hit = cache.get(key)
            if hit is not None:
                cache.move_to_end(key)
            return hit

    def _put(self, cache: OrderedDict, key: Hashable, value):
        with self._lock:
            self.builds += 1
            cache[key] = value
            if len(cache) > self.capacity:
                cache.popitem(last=False)
            return value

    def row(self, tensors: Sequence[Tensor], device: torch.device, what: str,
            fresh: bool = False) -> Row:
        """The pointer row of ``tensors`` (non-empty), validated when first seen.

        ``fresh``: the caller may hand over a new list every step (gradients) or the list
        defines the chunk layout (params): its sizes join the cache key and its contiguity
        is checked on every call. Other lists (state, tangents) are keyed by address and
        first dtype alone, the cheapest check (about 0.1 us a tensor), and their sizes are
        compared with the params' by the caller.
        """
        ptrs = tuple(map(Tensor.data_ptr, tensors))
        dtype = tensors[0].dtype
        numels = None
        if fresh:
            check_contiguous(tensors, what)
            numels = tuple(map(Tensor.numel, tensors))
            key = (device, dtype, ptrs, numels)
        else:
            key = (device, dtype, ptrs)
        hit = self._get(self._rows, key)
        if hit is not None:
            return hit
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"triton backend: {what} must be floating point "
                            f"(float16, bfloat16, float32, float64), got {dtype}")
        for i, t in enumerate(tensors):
            if t.device != device:
                raise ValueError(f"triton backend: {what}[{i}] is on {t.device}, "
                                 f"expected {device} like the parameters")
            if t.dtype != dtype:
                raise TypeError(f"triton backend: {what} mixes dtypes ({what}[0] is "
                                f"{dtype}, {what}[{i}] is {t.dtype}); one group, one dtype")
        check_contiguous(tensors, what)
        row = Row(
            ptrs=_to_device(torch.tensor(ptrs, dtype=torch.int64), device),
            numels=numels if numels is not None else tuple(map(Tensor.numel, tensors)),
            dtype=dtype,
            aligned=all(p % 16 == 0 for p in ptrs),
        )
        return self._put(self._rows, key, row)

    def layout(self, numels: tuple[int, ...], device: torch.device, chunk: int) -> Layout:
        key = (device, chunk, numels)
        hit = self._get(self._layouts, key)
        if hit is not None:
            return hit
        n = torch.tensor(numels, dtype=torch.int64)
        n_full = n // chunk
        owner = torch.repeat_interleave(torch.arange(len(numels)), n_full)
        first = torch.cumsum(n_full, 0) - n_full  # index of each tensor's first full chunk
        starts = (torch.arange(owner.numel()) - first[owner]) * chunk
        has_tail = torch.nonzero(n % chunk).flatten()
        packed = torch.cat([
            n,
            torch.stack([owner, starts], 1).flatten(),
            torch.stack([has_tail, n_full[has_tail] * chunk], 1).flatten(),
        ])
        dev = _to_device(packed, device)
        t, f = len(numels), owner.numel()
        layout = Layout(
            numels=dev[:t],
            full=dev[t:t + 2 * f].view(f, 2),
            tail=dev[t + 2 * f:].view(-1, 2),
        )
        return self._put(self._layouts, key, layout)

    def constants(self, values: tuple[float, ...], device: torch.device) -> Tensor:
        """A float64 device tensor holding ``values`` (fixed hyperparameters)."""
        key = (device, values)
        hit = self._get(self._consts, key)
        if hit is not None:
            return hit
        host = torch.tensor(values, dtype=torch.float64)
        return self._put(self._consts, key, _to_device(host, device))
