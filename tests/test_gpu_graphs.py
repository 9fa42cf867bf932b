"""GPU: the update path through the ``marthe::`` ops captured in a CUDA graph.

The capturable design: every value that changes between steps lives in a static device
buffer (weights, state, tangents, gradients and HVPs copied in before each replay; eta,
beta, mu, the step count and the LR statistics as float64 device scalars), and nothing in
the path reads a device value on the host or allocates outside the graph's pool once the
backends' tables are warm. So one capture replays every later step, skipped steps included
(the skip is the device flag ``ok`` inside ``coeffs``, not a host branch).

Replay must equal eager bit for bit: both run the same kernels on the same data.
Run with ``MARTHE_GPU_TESTS=1 python -m pytest -m gpu tests/`` (conftest.py skips it elsewhere).
"""
from __future__ import annotations

import pytest
import torch

from marthe_ext.backends import load_backend
from test_ops import (
    CFG, _assert_identical, _buffers, _clone, _load_step_inputs, _scalars, _update_path,
)

pytestmark = pytest.mark.gpu

STEPS = 6


def _snapshot(bufs, scalars):
    return _clone(bufs), {k: v.clone() for k, v in scalars.items()}


def _restore(bufs, scalars, snap):
    """Copy the saved values back into the same storage: the graph keeps the addresses."""
    sb, ss = snap
    for dst, src in zip((bufs.params, bufs.tangents, *bufs.state, *bufs.state_tangents),
                        (sb.params, sb.tangents, *sb.state, *sb.state_tangents)):
        for d, s in zip(dst, src):
            d.copy_(s)
    for k, v in ss.items():
        scalars[k].copy_(v)


@pytest.mark.parametrize("backend", ("torch", "triton", "cuda"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("f32", "f64"))
def test_graph_replay_equals_eager(backend, dtype):
    load_backend(backend)  # on the GPU machine an unavailable backend is a failure
    cuda = torch.device("cuda")
    opts = CFG.group_options(0.01)
    start = _buffers("adam", dtype=dtype, device=cuda)

    eager, eager_s = _clone(start), _scalars(cuda)
    etas = []
    for t in range(STEPS):
        _load_step_inputs(eager, t)
        _update_path(backend, opts, eager, eager_s)
        etas.append(eager_s["eta"].item())

    graphed, graphed_s = _clone(start), _scalars(cuda)
    snap = _snapshot(graphed, graphed_s)
    _load_step_inputs(graphed, 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, tables are built and cached
        for _ in range(2):
            _update_path(backend, opts, graphed, graphed_s)
    torch.cuda.current_stream().wait_stream(side)
    _restore(graphed, graphed_s, snap)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _update_path(backend, opts, graphed, graphed_s)
    _restore(graphed, graphed_s, snap)  # capture does not run the kernels; be sure anyway
    for t in range(STEPS):
        _load_step_inputs(graphed, t)
        graph.replay()
    torch.cuda.synchronize()

    assert len(set(etas)) >= 4 and etas[3] == etas[2], etas  # eta moves, not on the skip
    _assert_identical(graphed, eager)
    for k, v in eager_s.items():
        assert torch.equal(graphed_s[k], v), (k, graphed_s[k], v)
