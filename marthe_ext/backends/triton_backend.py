"""The Triton backend: host launchers for ``marthe_ext.triton_kernels``.

Each operation validates its lists, fetches the cached pointer rows and chunk layout
(``triton_kernels.tables``) and launches at most two kernels per dtype group: one over
the chunks wholly inside their tensor (unmasked, vectorisable) and one over the tensors'
last partial chunks (masked). The launch count therefore does not grow with the number
of tensors. Nothing here synchronises with the device or queries CUDA at import.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
Params and grads may be float16, bfloat16, float32 or float64; state and tangents
float32 or float64 (the compute dtype, as in the torch reference).
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton.language as tl
from torch import Tensor

from ..triton_kernels import (
    _adam_update_kernel, _all_finite_kernel, _clipped_dot_kernel, _sgd_update_kernel,
    _sgdm_update_kernel,
)
from ..triton_kernels._common import pack_hyper
from ..triton_kernels.tables import Layout, Row, TableCache
from .api import DYNAMICS, N_COEFFS, STATE_NAMES, GroupBuffers, GroupOptions

_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@dataclass(frozen=True)
class LaunchConfig:
    """Work per program: ``unroll`` blocks of ``block`` elements (one chunk)."""

    block: int
    unroll: int
    num_warps: int

    def __post_init__(self):
        power_of_two = self.block >= 1 and not self.block & (self.block - 1)
        if not power_of_two or self.unroll < 1 or self.num_warps < 1:
            raise ValueError(f"block must be a power of two and unroll, num_warps >= 1: {self}")

    @property
    def chunk(self) -> int:
        return self.block * self.unroll


def default_config(device: torch.device) -> LaunchConfig:
    if device.type == "cuda":
        # One 16-byte vector per thread per float32 buffer; Adam stays under ~90
        # registers (sm_90), and 4 blocks per program amortise the table reads.
        return LaunchConfig(block=1024, unroll=4, num_warps=8)
    # The interpreter runs programs one after another, each op costing Python time:
    # fewer, larger blocks are faster there.
    return LaunchConfig(block=2048, unroll=1, num_warps=1)


class TritonBackend:
    name = "triton"

    def __init__(self, config: Optional[LaunchConfig] = None):
        """``config`` overrides the per-device default (tests, benchmarks). Each instance
        has its own table cache: select_backend gives every optimizer its own instance."""
        self.config = config
        self._tables = TableCache()

    @property
    def tables_built(self) -> int:
        """Pointer/chunk tables built so far (cache misses): flat in a steady training loop."""
        return self._tables.builds

    def _config(self, device: torch.device) -> LaunchConfig:
        return self.config if self.config is not None else default_config(device)

    def _launch(self, kernel, layout: Layout, args: tuple, out: Optional[Tensor],
                cfg: LaunchConfig, **meta) -> None:
        """One launch over the full chunks, one over the tail chunks; ``out`` (partial
        results, one per chunk, full chunks first) is split between them."""
        n_full = layout.full.shape[0]
        device = layout.numels.device
        # Triton launches on the current CUDA device, torch ops on the tensors' own.
        guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with guard:
            for part, masked, dest in (
                (layout.full, False, None if out is None else out[:n_full]),
                (layout.tail, True, None if out is None else out[n_full:]),
            ):
                if part.shape[0] == 0:
                    continue
                extra = () if dest is None else (dest,)
                # No FMA contraction: the same roundings as the torch reference's
                # separate multiplies and adds.
                kernel[(part.shape[0],)](
                    part, layout.numels, *args, *extra, MASKED=masked, BLOCK=cfg.block,
                    UNROLL=cfg.unroll, num_warps=cfg.num_warps, enable_fp_fusion=False, **meta)

    def fused_update_(self, opts: GroupOptions, bufs: GroupBuffers, coeffs: Tensor) -> None:
        d = opts.dynamics
        if d not in DYNAMICS:
            raise ValueError(f"unknown dynamics {d!r}; expected one of {DYNAMICS}")
        n = len(bufs.params)
        n_state = len(STATE_NAMES[d])
        if len(bufs.state) != n_state or len(bufs.state_tangents) != n_state:
            raise ValueError(f"{d} needs {n_state} state list(s) {STATE_NAMES[d]} and as many "
                             f"state tangent lists, got {len(bufs.state)} and "
                             f"{len(bufs.state_tangents)}")
        lists = {"params": bufs.params, "grads": bufs.grads, "tangents": bufs.tangents}
        if bufs.hvps is not None:
            lists["hvps"] = bufs.hvps
        for name, lst in zip(STATE_NAMES[d], bufs.state):
            lists[name] = lst
        for name, lst in zip(STATE_NAMES[d], bufs.state_tangents):
            lists[f"{name} tangents"] = lst
        for name, lst in lists.items():
            if len(lst) != n:
                raise ValueError(f"{name} has {len(lst)} tensors, params has {n}")
        if n == 0:
            return
        device = bufs.params[0].device
        _check_coeffs(coeffs, device)

        fresh = ("params", "grads", "hvps")
        rows = {name: self._tables.row(lst, device, name, fresh=name in fresh)
                for name, lst in lists.items()}
        w = rows["params"]
        for name, row in rows.items():
            if row.numels != w.numels:
                raise ValueError(f"{name} and params differ in size at index "
                                 f"{_first_mismatch(row.numels, w.numels)}")
        c_dt = rows["tangents"].dtype
        for name, row in rows.items():
            if name in ("params", "grads", "hvps"):
                continue
            if row.dtype not in (torch.float32, torch.float64) or row.dtype != c_dt:
                raise TypeError(
                    f"triton backend: state and tangents must all be float32 or all float64 "
                    f"(the compute dtype); tangents are {c_dt}, {name} {row.dtype}")

        cfg = self._config(device)
        layout = self._tables.layout(w.numels, device, cfg.chunk)
        hyper = self._tables.constants(tuple(pack_hyper(opts)), device)
        g = rows["grads"]
        h = rows.get("hvps", w)
        meta = dict(
            W_DT=_TL_DTYPE[w.dtype], G_DT=_TL_DTYPE[g.dtype], H_DT=_TL_DTYPE[h.dtype],
            C_DT=_TL_DTYPE[c_dt], HAS_HZ=bufs.hvps is not None,
            HAS_WD=opts.coupled_weight_decay != 0, HAS_CLIP=opts.grad_clip is not None,
            ALIGN=_align(rows.values()),
        )
        head = (w.ptrs, g.ptrs, h.ptrs, rows["tangents"].ptrs)
        if d == "sgd":
            self._launch(_sgd_update_kernel, layout, (*head, coeffs, hyper), None, cfg, **meta)
        elif d == "sgdm":
            name = STATE_NAMES[d][0]
            args = (*head, rows[name].ptrs, rows[f"{name} tangents"].ptrs, coeffs, hyper)
            self._launch(_sgdm_update_kernel, layout, args, None, cfg,
                         NESTEROV=bool(opts.nesterov), **meta)
        else:
            m_name, v_name = STATE_NAMES[d]
            args = (*head, rows[m_name].ptrs, rows[v_name].ptrs,
                    rows[f"{m_name} tangents"].ptrs, rows[f"{v_name} tangents"].ptrs,
                    coeffs, hyper)
            self._launch(_adam_update_kernel, layout, args, None, cfg,
                         DECOUPLED=d == "adamw", **meta)
        # The kernels write through raw pointers, unseen by autograd: bump the version
        # counters as an in-place torch op would, so that a backward through a graph that
        # saved one of these tensors raises instead of silently using the new values.
        torch.autograd.graph.increment_version(list(itertools.chain.from_iterable(
            lst for name, lst in lists.items() if name not in ("grads", "hvps"))))

    def clipped_dot(
        self,
        a: Sequence[Tensor],
        b: Sequence[Tensor],
        *,
        clip: Optional[float] = None,
        a_extra: Optional[Sequence[Tensor]] = None,
        a_extra_scale: float = 0.0,
        clip_b: bool = False,
    ) -> Tensor:
        has_extra = a_extra is not None and a_extra_scale != 0
        if len(b) != len(a) or (has_extra and len(a_extra) != len(a)):
            raise ValueError(f"clipped_dot: lists differ in length (a {len(a)}, b {len(b)}"
                             + (f", a_extra {len(a_extra)})" if has_extra else ")"))
        if not a:
            return torch.zeros((), dtype=torch.float64)
        device = a[0].device
        ra = self._tables.row(a, device, "a", fresh=True)
        rb = self._tables.row(b, device, "b", fresh=True)
        re = self._tables.row(a_extra, device, "a_extra", fresh=True) if has_extra else ra
        for name, row in (("b", rb), ("a_extra", re)):
            if row.numels != ra.numels:
                raise ValueError(f"clipped_dot: {name} and a differ in size at index "
                                 f"{_first_mismatch(row.numels, ra.numels)}")
        acc = torch.float64 if ra.dtype == torch.float64 else torch.float32
        cfg = self._config(device)
        layout = self._tables.layout(ra.numels, device, cfg.chunk)
        consts = self._tables.constants(
            (float(a_extra_scale), 0.0 if clip is None else float(clip)), device)
        out = torch.empty(layout.n_chunks, dtype=acc, device=device)
        self._launch(
            _clipped_dot_kernel, layout, (ra.ptrs, rb.ptrs, re.ptrs, consts), out, cfg,
            A_DT=_TL_DTYPE[ra.dtype], B_DT=_TL_DTYPE[rb.dtype], E_DT=_TL_DTYPE[re.dtype],
            ACC_DT=_TL_DTYPE[acc], HAS_EXTRA=has_extra, HAS_CLIP=clip is not None,
            CLIP_B=bool(clip_b) and clip is not None,
            ALIGN=_align((ra, rb, re)))
        return out.sum()

    def all_finite(self, lists: Sequence[Sequence[Tensor]]) -> Tensor:
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for lst in lists:
            for t in lst:
                by_dtype.setdefault(t.dtype, []).append(t)
        if not by_dtype:
            return torch.ones((), dtype=torch.bool)
        device = next(iter(by_dtype.values()))[0].device
        cfg = self._config(device)
        groups: list[tuple[Row, Layout]] = []
        for tensors in by_dtype.values():
            row = self._tables.row(tensors, device, "all_finite input", fresh=True)
            groups.append((row, self._tables.layout(row.numels, device, cfg.chunk)))
        out = torch.empty(sum(lay.n_chunks for _, lay in groups), dtype=torch.int32,
                          device=device)
        offset = 0
        for row, layout in groups:
            f_dt = tl.float64 if row.dtype == torch.float64 else tl.float32
            self._launch(_all_finite_kernel, layout, (row.ptrs,),
                         out[offset:offset + layout.n_chunks], cfg,
                         X_DT=_TL_DTYPE[row.dtype], F_DT=f_dt, ALIGN=_align((row,)))
            offset += layout.n_chunks
        return (out == 0).all()


def _check_coeffs(coeffs: Tensor, device: torch.device) -> None:
    if coeffs.dtype != torch.float64 or coeffs.device != device:
        raise TypeError(f"coeffs must be a float64 tensor on {device} (api.make_coeffs), "
                        f"got {coeffs.dtype} on {coeffs.device}")
    if coeffs.dim() != 1 or coeffs.numel() < N_COEFFS or not coeffs.is_contiguous():
        raise ValueError(f"coeffs must be a contiguous vector of {N_COEFFS} values, "
                         f"got shape {tuple(coeffs.shape)}")


def _align(rows) -> int:
    """The pointer alignment (bytes) every kernel may assume: 16 enables vector access."""
    return 16 if all(row.aligned for row in rows) else 1


def _first_mismatch(x: tuple, y: tuple) -> int:
    return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))


__all__ = ["LaunchConfig", "TritonBackend", "default_config"]
