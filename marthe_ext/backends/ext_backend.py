"""The compiled backends: C++ on the CPU (``"cpu"``), CUDA C++ on the GPU (``"cuda"``).

Both run the per-element maths of ``csrc/marthe_math.h`` (shared by the CPU loop and the
CUDA kernels) in one pass over memory, and equal :class:`~.torch_ref.TorchBackend` to the
last bit where the operation order allows (tests/test_ext_backend.py). The CUDA backend
reads ``coeffs`` on the device and launches on torch's current stream, passed as an
integer: no host synchronisation. Inputs are validated in C++ (device, dtype, shape,
contiguity), with errors that name the list and index at fault.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _ext
from .api import (
    COEFF_BC1, COEFF_BC2, COEFF_ETA, COEFF_MU, COEFF_OK, COEFF_SCALE, DYNAMICS, N_COEFFS,
    STATE_NAMES, GroupBuffers, GroupOptions,
)

_PY_LAYOUT = {
    "COEFF_ETA": COEFF_ETA, "COEFF_MU": COEFF_MU, "COEFF_SCALE": COEFF_SCALE,
    "COEFF_BC1": COEFF_BC1, "COEFF_BC2": COEFF_BC2, "COEFF_OK": COEFF_OK,
    "N_COEFFS": N_COEFFS,
}


class ExtBackend:
    """Backend protocol (see api.py) on a compiled extension.

    ``kind``: "cpu" or "cuda". ``allow_jit``: build the extension with ninja on first use
    when no installed build exists (see marthe_ext._ext). Raises
    ``marthe_ext._ext.ExtensionUnavailable`` with the reason when it cannot load.
    """

    def __init__(self, kind: str, allow_jit: bool = True) -> None:
        if kind not in _ext.KINDS:
            raise ValueError(f"ExtBackend kind must be one of {_ext.KINDS}, got {kind!r}")
        self.name = kind
        self._cuda = kind == "cuda"
        self._C = _ext.load_extension(kind, allow_jit=allow_jit)
        layout = dict(self._C.COEFF_LAYOUT)
        if layout != _PY_LAYOUT:
            raise _ext.ExtensionUnavailable(
                f"the compiled {kind} extension reads coeffs as {layout} but api.py lays them "
                f"out as {_PY_LAYOUT}: it is stale, rebuild it"
            )

    def __repr__(self) -> str:
        return f"ExtBackend({self.name!r})"

    def _stream(self, t: Tensor) -> tuple:
        """The current stream of ``t``'s device, as the trailing argument of a CUDA call.

        Tensors not on a GPU get a null stream: the binding rejects them with its own
        message before any launch."""
        if not self._cuda:
            return ()
        if t.device.type != "cuda":
            return (0,)
        return (torch.cuda.current_stream(t.device).cuda_stream,)

    def fused_update_(self, opts: GroupOptions, bufs: GroupBuffers, coeffs: Tensor) -> None:
        if opts.dynamics not in DYNAMICS:
            raise ValueError(f"dynamics must be one of {DYNAMICS}, got {opts.dynamics!r}")
        if not bufs.params:
            return
        n_state = len(STATE_NAMES[opts.dynamics])
        if len(bufs.state) != n_state or len(bufs.state_tangents) != n_state:
            raise ValueError(
                f"dynamics {opts.dynamics!r} takes {n_state} state lists "
                f"{STATE_NAMES[opts.dynamics]} and as many state tangent lists; got "
                f"{len(bufs.state)} and {len(bufs.state_tangents)}"
            )
        self._C.fused_update(
            opts.dynamics,
            list(bufs.params),
            list(bufs.grads),
            None if bufs.hvps is None else list(bufs.hvps),
            list(bufs.tangents),
            [list(s) for s in bufs.state],
            [list(s) for s in bufs.state_tangents],
            coeffs,
            float(opts.weight_decay),
            None if opts.grad_clip is None else float(opts.grad_clip),
            float(opts.momentum),
            bool(opts.nesterov),
            float(opts.beta1),
            float(opts.beta2),
            float(opts.eps),
            *self._stream(bufs.params[0]),
        )

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
        """``sum_i <clip(a_i + a_extra_scale * a_extra_i), clip?(b_i)>``, 0-dim.

        Float64 for float64 ``a``, else float32, accumulated in float64 in a fixed order
        (deterministic). Strided inputs are read through a contiguous copy.
        """
        if not a:
            if b:
                raise ValueError(f"clipped_dot got 0 tensors in a but {len(b)} in b")
            return torch.zeros((), dtype=torch.float64)
        return self._C.clipped_dot(
            list(a),
            list(b),
            None if a_extra is None else list(a_extra),
            float(a_extra_scale),
            None if clip is None else float(clip),
            bool(clip_b),
            *self._stream(a[0]),
        )

    def all_finite(self, lists: Sequence[Sequence[Tensor]]) -> Tensor:
        tensors = [t for lst in lists for t in lst]
        if not tensors:
            return torch.ones((), dtype=torch.bool)
        return self._C.all_finite(tensors, *self._stream(tensors[0]))


__all__ = ["ExtBackend"]
