"""The kernel-level workloads, shared by the kernel suite and the profiling scripts.

One random parameter group in a network-like layout (``split_sizes``), and the two ways
of running its elementwise update: a backend's ``fused_update_`` and the pure-autograd
path's (``torch.cat``, ``torch.optim`` step, tangent ops on flat vectors).
"""
from __future__ import annotations

import torch

from benchmarks.autograd_baseline import AutogradMarthe
from marthe_ext.backends.api import STATE_NAMES, GroupBuffers, GroupOptions, make_coeffs

DYNAMICS = ("sgd", "sgdm", "adam", "adamw")
IMPLS = ("torch", "triton", "cuda", "cpu", "autograd")
ETA, MU, STEP = 1e-3, 0.99, 10.0


def split_sizes(numel: int) -> list[int]:
    """A network-like list of tensor sizes summing to ``numel``: a few large weights and
    some small ones (the multi-tensor launch matters, not only the streaming)."""
    big = [numel * 4 // 10, numel * 25 // 100, numel * 15 // 100, numel // 10]
    rest = numel - sum(big)
    small = [rest // 4] * 3
    return big + small + [rest - sum(small)]


def make_buffers(dynamics: str, numel: int, dev, dtype=torch.float32):
    """Random buffers of one group (never zeros: zeros hide unwritten outputs and can run
    faster than real data)."""
    sizes = split_sizes(numel)
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(positive=False):
        out = [torch.randn(n, device=dev, dtype=dtype, generator=gen) for n in sizes]
        return [t.abs_() for t in out] if positive else out

    names = STATE_NAMES[dynamics]
    # Adam's second moment is non-negative.
    state = tuple(rand(positive=(name == "exp_avg_sq")) for name in names)
    return GroupBuffers(params=rand(), grads=rand(), hvps=rand(), tangents=rand(),
                        state=state, state_tangents=tuple(rand() for _ in names))


def fused_call(backend, dynamics, bufs, dev):
    """A no-argument call running ``backend``'s fused update on ``bufs`` (an HVP present)."""
    f64 = dict(dtype=torch.float64, device=dev)
    opts = GroupOptions(dynamics=dynamics)
    coeffs = make_coeffs(eta=torch.tensor(ETA, **f64), mu=torch.tensor(MU, **f64), lr_scale=1.0,
                         step=torch.tensor(STEP, **f64), opts=opts,
                         ok=torch.tensor(True, device=dev))
    return lambda: backend.fused_update_(opts, bufs, coeffs)


def autograd_call(dynamics, bufs):
    """A no-argument call running the pure-autograd path's elementwise part on ``bufs``."""
    params = [p.requires_grad_() for p in bufs.params]
    base = AutogradMarthe(params, lr=ETA, dynamics=dynamics, mu=MU)
    for name in ("z_w", "z_m", "z_v"):
        z = getattr(base, name)
        if z is not None:
            z.normal_()
    return lambda: base.update_from_lists(bufs.grads, bufs.hvps)
