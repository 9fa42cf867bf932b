"""GPU tests: the fast backends against the torch reference on CUDA tensors.

Run on a GPU machine with ``MARTHE_GPU_TESTS=1 python -m pytest -m gpu tests/`` (the GPU
check, benchmarks/gpu_check.sh, does). Elsewhere conftest.py skips them. Every case draws
fresh random data (never zeros) and compares every buffer the update writes: weights,
optimizer state and all tangents.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import marthe_ext
from marthe_ext.backends import load_backend
from marthe_ext.backends.api import STATE_NAMES, GroupBuffers, GroupOptions, make_coeffs
from marthe_ext.backends.torch_ref import TorchBackend

pytestmark = pytest.mark.gpu

FAST = ("triton", "cuda")
DYNAMICS = ("sgd", "sgdm", "adam", "adamw")
RTOL, ATOL = 1e-5, 1e-6  # float32: a few ulps of reordering, never a real difference


@pytest.fixture
def cuda():
    return torch.device("cuda")


def _fast(name):
    # On the GPU machine an unavailable fast backend is a failure, not a skip: the
    # check exists to show that they build and run there.
    return load_backend(name)


# ----------------------------------------------------------------- kernel level
def _group(dynamics, sizes, device, param_dtype=torch.float32, with_hvp=True, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(dtype=torch.float32, positive=False):
        out = [torch.randn(n, device=device, generator=gen).to(dtype) for n in sizes]
        return [t.abs_() for t in out] if positive else out

    names = STATE_NAMES[dynamics]
    return GroupBuffers(
        params=rand(param_dtype), grads=rand(param_dtype),
        hvps=rand(param_dtype) if with_hvp else None, tangents=rand(),
        state=tuple(rand(positive=name == "exp_avg_sq") for name in names),
        state_tangents=tuple(rand() for _ in names))


def _clone(bufs: GroupBuffers) -> GroupBuffers:
    c = lambda lst: [t.clone() for t in lst]  # noqa: E731
    return GroupBuffers(params=c(bufs.params), grads=c(bufs.grads),
                        hvps=None if bufs.hvps is None else c(bufs.hvps),
                        tangents=c(bufs.tangents), state=tuple(c(s) for s in bufs.state),
                        state_tangents=tuple(c(s) for s in bufs.state_tangents))


def _written(bufs: GroupBuffers) -> dict[str, list[torch.Tensor]]:
    out = {"params": bufs.params, "tangents": bufs.tangents}
    for i, s in enumerate(bufs.state):
        out[f"state{i}"] = s
    for i, s in enumerate(bufs.state_tangents):
        out[f"state_tangent{i}"] = s
    return out


def _coeffs(opts, device, ok=True):
    f64 = dict(dtype=torch.float64, device=device)
    return make_coeffs(eta=torch.tensor(0.01, **f64), mu=torch.tensor(0.9, **f64), lr_scale=0.5,
                       step=torch.tensor(3.0, **f64), opts=opts, ok=torch.tensor(ok, device=device))


def _compare(backend_name, opts, bufs, ok=True, rtol=RTOL, atol=ATOL):
    """Run the fast backend and the reference on copies of ``bufs``; compare all outputs."""
    ref = _clone(bufs)
    before = _clone(bufs)
    coeffs = _coeffs(opts, bufs.params[0].device, ok)
    TorchBackend().fused_update_(opts, ref, coeffs)
    _fast(backend_name).fused_update_(opts, bufs, coeffs)
    torch.cuda.synchronize()
    got, want, old = _written(bufs), _written(ref), _written(before)
    for name in want:
        for i, (a, b, o) in enumerate(zip(got[name], want[name], old[name])):
            if not ok:
                assert torch.equal(a, o), f"{name}[{i}] changed on a skipped step"
            elif a.dtype == torch.bfloat16:
                # Both round the same float32 value to bfloat16; float32 reordering may move
                # it across a rounding boundary: at most one bfloat16 ulp (2^-7 relative).
                diff = (a.float() - b.float()).abs()
                assert bool((diff <= 2.0 ** -7 * b.float().abs()).all()), f"{name}[{i}]"
            else:
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}[{i}]: {m}")


OPTION_CASES = [
    ("plain", {}),
    ("wd+clip", dict(weight_decay=0.01, grad_clip=0.5)),
    ("nesterov", dict(nesterov=True)),
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dynamics", DYNAMICS)
@pytest.mark.parametrize("label,extra", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_fused_update_matches_reference(backend, dynamics, label, extra, cuda):
    if extra.get("nesterov") and dynamics != "sgdm":
        pytest.skip("nesterov is an sgdm option")
    opts = GroupOptions(dynamics=dynamics, **extra)
    sizes = [4097, 1, 0, 33, (1 << 16) + 3, 1000]
    _compare(backend, opts, _group(dynamics, sizes, cuda))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_fused_update_without_hvp_and_skipped_step(backend, dynamics, cuda):
    opts = GroupOptions(dynamics=dynamics)
    _compare(backend, opts, _group(dynamics, [4097, 5], cuda, with_hvp=False))
    _compare(backend, opts, _group(dynamics, [4097, 5], cuda, seed=1), ok=False)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_bf16_params_float32_state(backend, dynamics, cuda):
    opts = GroupOptions(dynamics=dynamics, weight_decay=0.01)
    _compare(backend, opts, _group(dynamics, [4097, 77, (1 << 16) + 1], cuda,
                                   param_dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_thousand_tiny_tensors(backend, dynamics, cuda):
    sizes = torch.randint(0, 18, (1000,), generator=torch.Generator().manual_seed(3)).tolist()
    _compare(backend, GroupOptions(dynamics=dynamics, grad_clip=1.0), _group(dynamics, sizes, cuda))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_hundred_million_elements(backend, dynamics, cuda):
    """One tensor of 1e8 elements: indexing and chunking past 2^26, the tail included."""
    n = 100_000_000
    opts = GroupOptions(dynamics=dynamics)
    bufs = _group(dynamics, [n], cuda)
    ref = _clone(bufs)
    coeffs = _coeffs(opts, cuda)
    TorchBackend().fused_update_(opts, ref, coeffs)
    _fast(backend).fused_update_(opts, bufs, coeffs)
    for name, got in _written(bufs).items():
        a, b = got[0], _written(ref)[name][0]
        rel = float((a.double() - b.double()).norm() / b.double().norm())
        assert rel < RTOL, f"{name}: relative error {rel:.2e}"
        torch.testing.assert_close(a[-5000:], b[-5000:], rtol=RTOL, atol=ATOL)
    del ref, bufs
    torch.cuda.empty_cache()


# ----------------------------------------------------------------- Marthe level
def _mlp(device, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 5)).to(device=device, dtype=dtype)


def _cnn(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).to(device)


def _batches(device, steps, shape=(20,), dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        xs = [torch.randn(32, *shape, generator=gen) for _ in range(2)]
        ys = [torch.randint(0, 5, (32,), generator=gen) for _ in range(2)]
        out.append([(x.to(device, dtype), y.to(device)) for x, y in zip(xs, ys)])
    return out


def _train(model, opt, batches, val_mode=True):
    for (x, y), (xv, yv) in batches:
        closure = lambda: F.cross_entropy(model(x).float(), y)  # noqa: E731
        val = (lambda: F.cross_entropy(model(xv).float(), yv)) if val_mode else None  # noqa: E731
        opt.step(closure, val)
    torch.cuda.synchronize()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: after a few steps, float32 differences of the update feed back
    through the gradients, so single elements may drift further than the whole tensor."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_optimizers_close(model, opt, ref_model, ref_opt, rel):
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert _rel(p, q) <= rel, f"param {n}: relative error {_rel(p, q):.2e}"
        for key, t in opt.state[p].items():
            err = _rel(t, ref_opt.state[q][key])
            assert err <= rel, f"state {key} of {n}: relative error {err:.2e}"
    assert opt.lr == pytest.approx(ref_opt.lr, rel=rel)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dynamics", DYNAMICS)
def test_marthe_matches_torch_backend(backend, dynamics, cuda):
    kwargs = dict(lr=0.01 if dynamics.startswith("adam") else 0.1, dynamics=dynamics, mu=0.99,
                  hyper_lr=1e-3, weight_decay=1e-3, hvp="reverse", hypergrad="grad")
    ref_model = _mlp(cuda)
    model = copy.deepcopy(ref_model)
    ref_opt = marthe_ext.Marthe(ref_model.parameters(), backend="torch", **kwargs)
    opt = marthe_ext.Marthe(model.parameters(), backend=backend, **kwargs)
    batches = _batches(cuda, 3)
    _train(ref_model, ref_opt, batches)
    _train(model, opt, batches)
    _assert_optimizers_close(model, opt, ref_model, ref_opt, RTOL)


@pytest.mark.parametrize("backend", FAST)
def test_marthe_on_conv_net(backend, cuda):
    """Convolutions' double backward returns non-contiguous HVPs: they must be handled."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # same rounding in both runs' convolutions
    try:
        kwargs = dict(lr=0.05, dynamics="sgdm", mu=0.99, hyper_lr=1e-3, hvp="reverse")
        ref_model = _cnn(cuda)
        model = copy.deepcopy(ref_model)
        ref_opt = marthe_ext.Marthe(ref_model.parameters(), backend="torch", **kwargs)
        opt = marthe_ext.Marthe(model.parameters(), backend=backend, **kwargs)
        batches = _batches(cuda, 3, shape=(3, 8, 8))
        _train(ref_model, ref_opt, batches)
        _train(model, opt, batches)
        _assert_optimizers_close(model, opt, ref_model, ref_opt, RTOL)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dynamics", ("sgdm", "adam"))
def test_marthe_bf16_params(backend, dynamics, cuda):
    kwargs = dict(lr=0.01 if dynamics == "adam" else 0.1, dynamics=dynamics, mu=0.99,
                  hyper_lr=1e-3, hvp="reverse")
    ref_model = _mlp(cuda, torch.bfloat16)
    model = copy.deepcopy(ref_model)
    ref_opt = marthe_ext.Marthe(ref_model.parameters(), backend="torch", **kwargs)
    opt = marthe_ext.Marthe(model.parameters(), backend=backend, **kwargs)
    batches = _batches(cuda, 2, dtype=torch.bfloat16)
    _train(ref_model, ref_opt, batches)
    _train(model, opt, batches)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert p.dtype == torch.bfloat16 and opt.state[p]["tangent"].dtype == torch.float32
        assert _rel(p, q) < 1e-2, f"params: relative error {_rel(p, q):.2e}"
        zt, zr = opt.state[p]["tangent"], ref_opt.state[q]["tangent"]
        assert _rel(zt, zr) < 1e-2, f"tangents: relative error {_rel(zt, zr):.2e}"


@contextlib.contextmanager
def _sync_debug_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("backend", ("torch",) + FAST)
@pytest.mark.parametrize("dynamics", ("sgdm", "adam"))
@pytest.mark.parametrize("val_mode", (True, False), ids=("val", "train"))
@pytest.mark.parametrize("safeguards", (None, "robust"), ids=("faithful", "robust"))
def test_step_never_waits_for_the_device(backend, dynamics, val_mode, safeguards, cuda):
    """No host synchronisation inside step() (hvp reverse, hypergrad grad): the CPU can
    queue the next step while the GPU works. CUDA's sync debug mode raises on any."""
    model = _mlp(cuda)
    opt = marthe_ext.Marthe(model.parameters(), lr=0.01, dynamics=dynamics, mu=0.99,
                            hyper_lr=1e-3, hvp="reverse", hypergrad="grad", backend=backend,
                            safeguards=safeguards)
    batches = _batches(cuda, 4)
    _train(model, opt, batches[:3], val_mode)  # state, kernels and tables built here
    (x, y), (xv, yv) = batches[3]
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    val = (lambda: F.cross_entropy(model(xv), yv)) if val_mode else None  # noqa: E731
    with _sync_debug_error():
        opt.step(closure, val)
    torch.cuda.synchronize()
    assert torch.isfinite(torch.tensor(opt.lr))
