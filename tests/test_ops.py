"""The ``torch.library`` ops of ``marthe_ext/ops.py``.

* ``torch.library.opcheck`` (schema incl. the declared mutations, fake kernels against the
  real outputs, autograd registration, AOT dispatch) on every op for every backend that
  runs here: torch, cpu, and triton under TRITON_INTERPRET=1.
* Each op equals the backend method it wraps, bit for bit.
* A function doing the whole update path (all_finite, clipped_dot, the LR update,
  make_coeffs, the fused update) through the ops gives bit-identical buffers under
  ``torch.compile(fullgraph=True)`` and eagerly, over steps that include a skipped one.
"""
from __future__ import annotations

import math

import pytest
import torch

from marthe_ext import ops
from marthe_ext.backends.api import STATE_NAMES, GroupBuffers, GroupOptions, make_coeffs
from marthe_ext.config import MartheConfig
from marthe_ext.controller import HyperController, lr_update_
from required_backends import backend_or_skip

F64 = dict(dtype=torch.float64)
SIZES = (7, 1, 33)
BACKENDS = ("torch", "cpu", pytest.param("triton", marks=pytest.mark.triton))
ALL_DYNAMICS = tuple(STATE_NAMES)


def _opts(dynamics, clip=0.5):
    return GroupOptions(dynamics=dynamics, weight_decay=0.01, grad_clip=clip, momentum=0.9,
                        nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8)


def _buffers(dynamics, dtype=torch.float32, with_hvp=True, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rand(positive=False):
        out = [torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype) for n in SIZES]
        return [t.abs() for t in out] if positive else out

    names = STATE_NAMES[dynamics]
    return GroupBuffers(params=rand(), grads=rand(), hvps=rand() if with_hvp else None,
                        tangents=rand(),
                        state=tuple(rand(positive=n == "exp_avg_sq") for n in names),
                        state_tangents=tuple(rand() for _ in names))


def _coeffs(opts, ok=True):
    return make_coeffs(eta=torch.tensor(0.01, **F64), mu=torch.tensor(0.9, **F64), lr_scale=0.5,
                       step=torch.tensor(3.0, **F64), opts=opts, ok=torch.tensor(ok))


def _clone(bufs):
    c = lambda lst: [t.clone() for t in lst]  # noqa: E731
    return GroupBuffers(params=c(bufs.params), grads=c(bufs.grads),
                        hvps=None if bufs.hvps is None else c(bufs.hvps), tangents=c(bufs.tangents),
                        state=tuple(c(s) for s in bufs.state),
                        state_tangents=tuple(c(s) for s in bufs.state_tangents))


def _written(bufs):
    return [bufs.params, bufs.tangents, *bufs.state, *bufs.state_tangents]


def _assert_identical(got, want):
    for lg, lw in zip(_written(got), _written(want), strict=True):
        for g, w in zip(lg, lw, strict=True):
            assert torch.equal(g, w), (g - w).abs().max()


def _update_args(backend, opts, bufs, coeffs):
    flat = lambda lists: [t for lst in lists for t in lst]  # noqa: E731
    return (backend, opts.dynamics, bufs.params, bufs.grads, bufs.hvps or [], bufs.tangents,
            flat(bufs.state), flat(bufs.state_tangents), coeffs, opts.weight_decay,
            opts.grad_clip, opts.momentum, opts.nesterov, opts.beta1, opts.beta2, opts.eps)


# ------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dynamics", ALL_DYNAMICS)
@pytest.mark.parametrize("with_hvp", (True, False), ids=("hvp", "no_hvp"))
def test_opcheck_fused_update(backend, dynamics, with_hvp):
    backend_or_skip(backend)
    opts = _opts(dynamics, clip=None if with_hvp else 0.5)
    bufs = _buffers(dynamics, with_hvp=with_hvp)
    torch.library.opcheck(ops.fused_update_op, _update_args(backend, opts, bufs, _coeffs(opts)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_opcheck_reductions(backend, dtype):
    backend_or_skip(backend)
    a, b, e = (_buffers("sgd", dtype=dtype, seed=s).params for s in (1, 2, 3))
    for args in ((backend, a, b, e, 0.1, 0.5, True), (backend, a, b, [], 0.0, None, False),
                 (backend, [], [], [], 0.0, None, False)):
        torch.library.opcheck(ops.clipped_dot_op, args)
    for tensors in (a + b, [a[0], torch.tensor([1.0, math.inf], dtype=dtype)], [],
                    [torch.empty(0, dtype=dtype)]):
        torch.library.opcheck(ops.all_finite_op, (backend, tensors))


@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_fake_kernels_describe_cuda_outputs_without_a_gpu(backend):
    """What a compiled graph for a GPU assumes: dtype, shape and device of each output, from
    the fake kernels alone (the "cuda" backend cannot even load here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        cuda = torch.device("cuda")
        bufs = GroupBuffers(*([torch.empty(n, device=cuda) for n in SIZES] for _ in range(4)),
                            state=([torch.empty(n, device=cuda) for n in SIZES],),
                            state_tangents=([torch.empty(n, device=cuda) for n in SIZES],))
        coeffs = torch.empty(6, dtype=torch.float64, device=cuda)
        ops.fused_update_(backend, _opts("sgdm"), bufs, coeffs)
        with pytest.raises(ValueError, match="adam takes 2 state list"):
            ops.fused_update_(backend, _opts("adam"), bufs, coeffs)
        for a, dtype in ((bufs.grads, torch.float32),
                         ([t.double() for t in bufs.grads], torch.float64),
                         ([t.bfloat16() for t in bufs.grads], torch.float32)):
            h = ops.clipped_dot(backend, a, a, clip=0.5)
            assert (h.shape, h.dtype, h.device.type) == ((), dtype, "cuda")
        ok = ops.all_finite(backend, [bufs.grads, bufs.hvps])
        assert (ok.shape, ok.dtype, ok.device.type) == ((), torch.bool, "cuda")


# ------------------------------------------------------------------ same as the backends
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dynamics", ALL_DYNAMICS)
def test_ops_equal_the_backend_methods(backend, dynamics):
    impl = backend_or_skip(backend)
    opts = _opts(dynamics)
    bufs = _buffers(dynamics)
    via_op, direct = _clone(bufs), _clone(bufs)
    ops.fused_update_(backend, opts, via_op, _coeffs(opts))
    impl.fused_update_(opts, direct, _coeffs(opts))
    _assert_identical(via_op, direct)
    assert not torch.equal(via_op.params[0], bufs.params[0]), "the update must move the weights"

    kw = dict(clip=0.5, a_extra=bufs.params, a_extra_scale=0.01)
    got = ops.clipped_dot(backend, bufs.grads, bufs.tangents, **kw)
    assert torch.equal(got, impl.clipped_dot(bufs.grads, bufs.tangents, **kw))
    bad = [bufs.grads[0], torch.tensor([math.nan])]
    assert ops.all_finite(backend, [bufs.grads, bufs.hvps]).item() is True
    assert ops.all_finite(backend, [bufs.grads, bad]).item() is False


def test_bad_arguments_raise_clear_errors():
    opts = _opts("adam")
    bufs = _buffers("adam")
    args = list(_update_args("torch", opts, bufs, _coeffs(opts)))
    args[6] = args[6][:-1]  # one state tensor short
    with pytest.raises(ValueError, match="adam takes 2 state list"):
        ops.fused_update_op(*args)
    args = list(_update_args("torch", opts, bufs, _coeffs(opts)))
    args[4] = args[4][:2]  # hvps short
    with pytest.raises(ValueError, match=r"hvps has 2 tensors, params has 3 \(hvps: \[\] for"):
        ops.fused_update_op(*args)
    with pytest.raises(ValueError, match="tangents has 2 tensors"):
        ops.fused_update_(
            "torch", opts, GroupBuffers(bufs.params, bufs.grads, None, bufs.tangents[:2],
                                        bufs.state, bufs.state_tangents), _coeffs(opts))
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.clipped_dot("auto", bufs.grads, bufs.tangents)
    with pytest.raises(ValueError, match="a has 3 tensors, b 2"):
        ops.clipped_dot("torch", bufs.grads, bufs.tangents[:2])


# ------------------------------------------------------------------ compiled == eager
CFG = MartheConfig.from_arguments(
    lr=0.05, dynamics="adam", momentum=0.9, nesterov=False, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0.01, mu=0.9, hyper_lr=None, hyper_lr_adapt=0.0, grad_clip=0.5, hvp="reverse",
    hypergrad="grad", backend="torch", max_lr_change=None, max_lr_growth=None,
    hypergrad_norm=None, hypergrad_norm_decay=0.99, max_tangent_ratio=None, hyper_lr_rprop=None,
    hyper_lr_bounds=(1e-6, 0.1), safeguards="robust", has_model=False)
# Step t's training loss: falls, then climbs past the default's loss trust region (e) at t = 4.
LOSSES = (1.0, 0.8, 0.7, 0.6, 5.0, 6.0)


def _scalars(device="cpu"):
    """The controller's scalars at their start values, as ``(1,)`` float64 device tensors."""
    start = HyperController(CFG, torch.device("cpu")).scalars
    return {k: v.reshape(1).to(device=device, copy=True) for k, v in start.items()}


def _load_step_inputs(bufs, t):
    """Step t's gradients and HVPs, written into ``bufs``' own storage (static buffers);
    step 3 has an infinite gradient, so it is skipped."""
    fresh = _buffers("adam", dtype=bufs.grads[0].dtype, seed=10 + t,
                     device=bufs.grads[0].device)
    for dst, src in ((bufs.grads, fresh.grads), (bufs.hvps, fresh.hvps)):
        for d, s in zip(dst, src):
            d.copy_(s)
    if t == 3:
        bufs.grads[1].fill_(math.inf)


def _update_path(backend, opts, bufs, scalars, loss, lr_scale=0.5):
    """One train-mode step's update path through the ops: the finite flag, h, the LR update
    (the robust safeguards: rprop, rms-log, growth cap, loss trust), Adam's coefficients, the update.

    Scalars are ``(1,)`` tensors: compiled code drops in-place writes to 0-dim CPU inputs
    (see fused_lr.py)."""
    ok = ops.all_finite(backend, [bufs.grads, bufs.hvps])
    h = ops.clipped_dot(backend, bufs.grads, bufs.tangents, clip=opts.grad_clip,
                        a_extra=bufs.params, a_extra_scale=opts.coupled_weight_decay)
    ok = ok & torch.isfinite(h)
    lr_update_(CFG, scalars, h.to(torch.float64).reshape(1), ok.reshape(1), loss)
    step_k = scalars["step"] + ok.to(torch.float64)
    scalars["step"].copy_(step_k)
    coeffs = make_coeffs(eta=scalars["eta"].reshape(()), mu=scalars["mu"].reshape(()),
                         lr_scale=lr_scale, step=step_k.reshape(()), opts=opts, ok=ok)
    ops.fused_update_(backend, opts, bufs, coeffs)


@pytest.mark.slow  # one compilation each, ~5-10 s on 2 busy cores
@pytest.mark.parametrize("backend", ("torch", "cpu"))
# float64 buffers: a 1-ulp change of a float64 coefficient shows in them (checked by hand,
# lr_scale * (1 + 2**-52)); float32 ones: the usual case.
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("f32", "f64"))
def test_compiled_update_path_equals_eager(backend, dtype):
    backend_or_skip(backend)
    opts = CFG.group_options(0.01)
    start = _buffers("adam", dtype=dtype)
    runs = {}
    for mode in ("eager", "compiled"):
        torch._dynamo.reset()
        fn = _update_path if mode == "eager" else torch.compile(_update_path, fullgraph=True)
        bufs = _clone(start)
        scalars = _scalars()
        etas = []
        for t in range(6):
            _load_step_inputs(bufs, t)
            fn(backend, opts, bufs, scalars, torch.tensor([LOSSES[t]], dtype=torch.float64))
            etas.append(scalars["eta"].item())
        runs[mode] = (bufs, scalars, etas)
    (eb, es, eetas), (cb, cs, cetas) = runs["eager"], runs["compiled"]
    assert len(set(eetas)) >= 4 and eetas[3] == eetas[2], eetas  # eta moves, not on the skip
    assert es["step"].item() == 5.0
    assert cetas == eetas  # step by step, not only at the end
    _assert_identical(cb, eb)
    # the loss trust region held eta at or below the LR of the best loss once the loss climbed
    assert es["loss_best"].item() < LOSSES[0] and max(eetas[4:]) <= es["lr_at_best"].item()
    for k in es:
        assert torch.equal(cs[k], es[k]), (k, cs[k], es[k])
