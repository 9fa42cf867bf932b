"""The compiled backends (csrc/) against the torch reference.

* ``ExtBackend("cpu")`` (the installed build, else built on first use with ninja) equals
  ``TorchBackend`` for every dynamics x clip x weight decay x HVPs x mu, over consecutive
  steps, on the weights and every state and tangent tensor: float64 to 1e-12 and float32 to
  1e-5 relative to each tensor's largest entry (torch's CPU sqrt is not correctly rounded,
  so Adam differs in the last bit), bfloat16 params to one bf16 ulp.
* The CUDA launcher cannot run here (no GPU). Its host planner and per-block bodies
  (csrc/cuda/multi_tensor.cuh, the code the kernels forward to) run on the CPU through
  tests/cuda_emulation.cpp and are checked the same way, with production and tiny table
  capacities and misaligned tensors. Every ``.cu`` file must compile with nvcc for sm_80
  and sm_90 without a warning, and the CUDA binding must compile, link with the nvcc objects
  and import.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import math
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from marthe_ext import _build_config as cfg
from marthe_ext import _ext
from marthe_ext.backends.api import (
    STATE_NAMES, GroupBuffers, GroupOptions, make_coeffs,
)
from marthe_ext.backends.ext_backend import ExtBackend
from marthe_ext.backends.torch_ref import TorchBackend

pytestmark = pytest.mark.ext

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
REF = TorchBackend()

CASES = [("sgd", False), ("sgdm", False), ("sgdm", True), ("adam", False), ("adamw", False)]
CASE_IDS = ["sgd", "sgdm", "sgdm-nesterov", "adam", "adamw"]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
SIZES = [(1,), (7,), (4097,), (0,), (3, 5)]
STATE_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float32,
               torch.bfloat16: torch.float32}


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


# ---------------------------------------------------------------- builders and comparisons


def _alloc(shape, dtype, offset: int) -> torch.Tensor:
    """A contiguous tensor, ``offset`` elements into its storage (offset 1: misaligned)."""
    n = math.prod(shape)
    return torch.empty(n + offset, dtype=dtype)[offset:].view(shape)


def _fill(shape, dtype, offset=0, kind="normal") -> torch.Tensor:
    t = _alloc(shape, dtype, offset)
    src = torch.rand(shape) if kind == "uniform" else torch.randn(shape)
    return t.copy_(src.to(dtype))


def make_buffers(dynamics, sizes, dtype, offset=0) -> GroupBuffers:
    """Random state of one group. A zero second moment (with a zero gradient at step 1, see
    make_inputs) drives Adam's v' = 0 branch; its first moment is zeroed there too."""
    sdt = STATE_DTYPE[dtype]
    names = STATE_NAMES[dynamics]
    state = tuple(
        [_fill(s, sdt, offset, "uniform" if name == "exp_avg_sq" else "normal") for s in sizes]
        for name in names
    )
    for lst in state:
        for t in lst:
            t.view(-1)[:1] = 0
    return GroupBuffers(
        params=[_fill(s, dtype, offset) for s in sizes],
        grads=[],
        hvps=None,
        tangents=[_fill(s, sdt, offset) for s in sizes],
        state=state,
        state_tangents=tuple([_fill(s, sdt, offset) for s in sizes] for _ in names),
    )


def clone_buffers(b: GroupBuffers, offset=0) -> GroupBuffers:
    def cl(ts):
        return [_alloc(t.shape, t.dtype, offset).copy_(t) for t in ts]

    return GroupBuffers(
        params=cl(b.params), grads=cl(b.grads), hvps=None if b.hvps is None else cl(b.hvps),
        tangents=cl(b.tangents), state=tuple(cl(s) for s in b.state),
        state_tangents=tuple(cl(s) for s in b.state_tangents),
    )


def all_lists(b: GroupBuffers):
    yield "params", b.params
    yield "tangents", b.tangents
    for i, s in enumerate(b.state):
        yield f"state[{i}]", s
    for i, s in enumerate(b.state_tangents):
        yield f"state_tangents[{i}]", s


def make_inputs(sizes, dtype, step, with_hvps, offset=0):
    grads = [_fill(s, dtype, offset) for s in sizes]
    if step == 1:
        for g in grads:
            g.view(-1)[:1] = 0
    hvps = [_fill(s, dtype, offset) for s in sizes] if with_hvps else None
    return grads, hvps


def coeffs_for(opts, step, mu, ok=True):
    f64 = torch.float64
    return make_coeffs(
        eta=torch.tensor(0.05 * (1 + 0.5 * step), dtype=f64), mu=torch.tensor(mu, dtype=f64),
        lr_scale=0.7, step=torch.tensor(float(step), dtype=f64), opts=opts,
        ok=torch.tensor(ok),
    )


def assert_close(actual, expected, tol, what, atol_rel=None):
    """Elementwise |a - e| <= tol |e| + atol_rel max|e| (atol_rel defaults to tol)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    assert torch.isfinite(e).all(), f"{what}: the reference itself is not finite"
    scale = e.abs().max().item()
    torch.testing.assert_close(
        a, e, rtol=tol, atol=(tol if atol_rel is None else atol_rel) * scale,
        msg=lambda m: f"{what}: {m}",
    )


def compare_buffers(actual: GroupBuffers, expected: GroupBuffers, tol, what, param_tol=None):
    for (name, la), (_, le) in zip(all_lists(actual), all_lists(expected)):
        t = param_tol if (name == "params" and param_tol is not None) else tol
        for i, (a, e) in enumerate(zip(la, le)):
            assert_close(a, e, t, f"{what}: {name}[{i}]")


def run_against_reference(backend, opts, dtype, sizes, *, with_hvps, mu, steps=3, offset=0,
                          tol=None, param_tol=None):
    """``steps`` consecutive updates through ``backend`` and TorchBackend, compared after
    each; grads and hvps must come back untouched."""
    tol = TOL[dtype] if tol is None else tol
    ref = make_buffers(opts.dynamics, sizes, dtype)
    ext = clone_buffers(ref, offset)
    for step in range(1, steps + 1):
        grads, hvps = make_inputs(sizes, dtype, step, with_hvps)
        coeffs = coeffs_for(opts, step, mu)
        for bufs, off in ((ref, 0), (ext, offset)):
            bufs.grads = [_alloc(g.shape, g.dtype, off).copy_(g) for g in grads]
            bufs.hvps = None if hvps is None else [
                _alloc(h.shape, h.dtype, off).copy_(h) for h in hvps]
        REF.fused_update_(opts, ref, coeffs)
        backend.fused_update_(opts, ext, coeffs)
        for i, g in enumerate(grads):
            assert torch.equal(ext.grads[i], g), f"grads[{i}] was modified"
            if hvps is not None:
                assert torch.equal(ext.hvps[i], hvps[i]), f"hvps[{i}] was modified"
        compare_buffers(ext, ref, tol, f"step {step}", param_tol)
    return ext


# ---------------------------------------------------------------- the CPU extension


@pytest.fixture(scope="module")
def ext():
    try:
        return ExtBackend("cpu", allow_jit=True)
    except _ext.ExtensionUnavailable as exc:
        if shutil.which(_compiler()) is None:
            pytest.skip(str(exc))
        raise


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mu", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("with_hvps", [False, True], ids=["no-hvp", "hvp"])
@pytest.mark.parametrize("wd", [0.0, 0.1], ids=["wd0", "wd"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_update_matches_reference(ext, case, clip, wd, with_hvps, mu, dtype):
    dynamics, nesterov = case
    opts = GroupOptions(dynamics=dynamics, weight_decay=wd, grad_clip=clip, nesterov=nesterov)
    run_against_reference(ext, opts, dtype, SIZES, with_hvps=with_hvps, mu=mu)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_update_bfloat16_params(ext, case):
    """bfloat16 params and grads, float32 state: rounding of w' may differ by one bf16 ulp
    where Adam's sqrt differs in the last float32 bit; everything else to float32 rounding
    of that difference."""
    dynamics, nesterov = case
    opts = GroupOptions(dynamics=dynamics, weight_decay=0.1, grad_clip=0.5, nesterov=nesterov)
    run_against_reference(ext, opts, torch.bfloat16, SIZES, with_hvps=True, mu=0.9,
                          tol=1e-3, param_tol=2.0 ** -7)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_update_many_tiny_tensors(ext, case):
    dynamics, nesterov = case
    gen = torch.Generator().manual_seed(1)
    sizes = [(int(n),) for n in torch.randint(0, 6, (300,), generator=gen)]
    opts = GroupOptions(dynamics=dynamics, weight_decay=0.1, grad_clip=0.5, nesterov=nesterov)
    run_against_reference(ext, opts, torch.float32, sizes, with_hvps=True, mu=0.9, steps=2)


@pytest.mark.parametrize("case", [("sgdm", True), ("adam", False)], ids=["sgdm-nesterov", "adam"])
def test_cpu_update_large_tensor_parallel(ext, case):
    """Large enough to spread over threads (several spans), misaligned by one element."""
    dynamics, nesterov = case
    opts = GroupOptions(dynamics=dynamics, weight_decay=0.01, grad_clip=1.0, nesterov=nesterov)
    run_against_reference(ext, opts, torch.float32, [(200_003,), (5,)], with_hvps=True,
                          mu=0.99, steps=2, offset=1)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_update_skipped_step_is_bit_identical(ext, case):
    dynamics, nesterov = case
    opts = GroupOptions(dynamics=dynamics, weight_decay=0.1, grad_clip=0.5, nesterov=nesterov)
    bufs = make_buffers(dynamics, SIZES, torch.float32)
    grads, hvps = make_inputs(SIZES, torch.float32, 2, True)
    for g in grads:
        if g.numel():
            g.view(-1)[-1] = float("nan")
    bufs.grads, bufs.hvps = grads, hvps
    before = clone_buffers(bufs)
    ext.fused_update_(opts, bufs, coeffs_for(opts, 2, 0.9, ok=False))
    for (name, la), (_, lb) in zip(all_lists(bufs), all_lists(before)):
        for i, (a, b) in enumerate(zip(la, lb)):
            assert torch.equal(a, b), f"{name}[{i}] changed although ok == 0"


def test_cpu_update_bumps_version_counters(ext):
    """As an in-place torch op would: autograd must see that the buffers changed."""
    opts = GroupOptions("adam")
    bufs = make_buffers("adam", [(5,)], torch.float32)
    bufs.grads, bufs.hvps = make_inputs([(5,)], torch.float32, 2, True)
    lists = [t for _, lst in all_lists(bufs) for t in lst]
    before = [t._version for t in lists]
    inputs = [bufs.grads[0]._version, bufs.hvps[0]._version]
    ext.fused_update_(opts, bufs, coeffs_for(opts, 1, 0.9))
    assert all(t._version > v for t, v in zip(lists, before))
    assert [bufs.grads[0]._version, bufs.hvps[0]._version] == inputs


def test_cpu_update_empty_group_is_a_no_op(ext, monkeypatch):
    """A group none of whose parameters got a gradient returns before the compiled code (the
    CUDA path would read params[0] for its stream), changes nothing, and leaves the next
    update of another group as the reference computes it."""
    calls = []
    compiled = ext._C

    class Spy:
        def __getattr__(self, name):
            return getattr(compiled, name)

        def fused_update(self, *args):
            calls.append(args[0])
            return compiled.fused_update(*args)

    monkeypatch.setattr(ext, "_C", Spy())
    opts = GroupOptions("adam")
    coeffs = coeffs_for(opts, 1, 0.9)
    saved = coeffs.clone()
    bufs = make_buffers("adam", [(5,), (3, 2)], torch.float32)
    bufs.grads, bufs.hvps = make_inputs([(5,), (3, 2)], torch.float32, 1, True)
    alone = clone_buffers(bufs)
    alone.grads, alone.hvps = bufs.grads, bufs.hvps

    assert ext.fused_update_(opts, GroupBuffers([], [], None, [], ([], []), ([], [])), coeffs) is None
    assert calls == [] and torch.equal(coeffs, saved)
    ext.fused_update_(opts, bufs, coeffs)
    assert calls == ["adam"]
    REF.fused_update_(opts, alone, saved)
    compare_buffers(bufs, alone, TOL[torch.float32], "after an empty group")


def _dot_inputs(a_dtype, b_dtype, sizes, with_extra):
    a = [torch.randn(s).to(a_dtype) for s in sizes]
    b = [torch.randn(s).to(b_dtype) for s in sizes]
    extra = [torch.randn(s).to(a_dtype) for s in sizes] if with_extra else None
    return a, b, extra


def _dot_scale(a, b, extra, scale, clip, clip_b):
    """sum |terms| in float64: the size of the rounding error a correct sum can make."""
    total = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = x.double(), y.double()
        if extra is not None:
            x = x + scale * extra[i].double()
        if clip is not None:
            x = x.clamp(-clip, clip)
            y = y.clamp(-clip, clip) if clip_b else y
        total += (x * y).abs().sum().item()
    return total


DOT_DTYPES = [
    (torch.float64, torch.float64), (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
]
DOT_IDS = ["f64", "f32", "bf16-f32", "f32-bf16", "bf16"]
DOT_SIZES = [(1,), (7,), (0,), (4097,), (3, 5)]


@pytest.mark.parametrize("clip_b", [False, True], ids=["", "clip_b"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
@pytest.mark.parametrize("extra", [None, 0.0, 0.3], ids=["noextra", "extra0", "extra"])
@pytest.mark.parametrize("dtypes", DOT_DTYPES, ids=DOT_IDS)
def test_cpu_clipped_dot_matches_reference(ext, dtypes, extra, clip, clip_b):
    a, b, x = _dot_inputs(*dtypes, DOT_SIZES, extra is not None)
    kw = dict(clip=clip, a_extra=x, a_extra_scale=extra or 0.0, clip_b=clip_b)
    got, want = ext.clipped_dot(a, b, **kw), REF.clipped_dot(a, b, **kw)
    assert got.dtype == want.dtype and got.shape == () and got.device == want.device
    tol = 1e-12 if dtypes[0] == torch.float64 else 1e-5
    scale = _dot_scale(a, b, x, extra or 0.0, clip, clip_b)
    assert abs(got.item() - want.item()) <= tol * scale, (got.item(), want.item())


def test_cpu_clipped_dot_many_tiny_and_empty(ext):
    sizes = [(int(n),) for n in torch.randint(0, 4, (1000,))]
    a, b, x = _dot_inputs(torch.float32, torch.float32, sizes, True)
    kw = dict(clip=0.5, a_extra=x, a_extra_scale=0.1)
    assert abs(ext.clipped_dot(a, b, **kw).item() - REF.clipped_dot(a, b, **kw).item()) <= (
        1e-5 * _dot_scale(a, b, x, 0.1, 0.5, False))
    assert ext.clipped_dot([], []).item() == 0.0
    assert ext.clipped_dot([torch.empty(0)], [torch.empty(0)]).item() == 0.0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
def test_cpu_clipped_dot_planted_non_finite(ext, value, clip):
    """As the reference: NaN propagates; an infinite a is clipped to +-c when clipping."""
    a, b, _ = _dot_inputs(torch.float32, torch.float32, [(7,), (4097,)], False)
    a[1][4096] = value
    got, want = ext.clipped_dot(a, b, clip=clip), REF.clipped_dot(a, b, clip=clip)
    assert math.isnan(got.item()) == math.isnan(want.item())
    assert math.isinf(got.item()) == math.isinf(want.item())
    if math.isfinite(want.item()):
        assert abs(got.item() - want.item()) <= 1e-5 * _dot_scale(a, b, None, 0, clip, False)
    else:
        assert not math.isfinite(got.item())


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["+", "-"])
def test_cpu_clipped_dot_beyond_float32_range_is_inf_as_the_reference(ext, sign):
    """Finite float32 products whose float64 sum leaves float32's range (a diverging run):
    +-inf, as the reference's float32 sum, not an error (found by issue 15's study)."""
    a = [torch.full((3,), 3e38), torch.full((2,), 2e38)]
    b = [torch.full((3,), sign), torch.full((2,), sign)]
    got, want = ext.clipped_dot(a, b), REF.clipped_dot(a, b)
    assert got.dtype == want.dtype == torch.float32
    assert got.item() == want.item() == sign * math.inf


def test_cpu_clipped_dot_parallel_and_deterministic(ext):
    """Large enough for several spans on several threads: same bits with 1 or 2 threads."""
    a, b, x = _dot_inputs(torch.float32, torch.float32, [(300_001,), (5,)], True)
    kw = dict(clip=0.5, a_extra=x, a_extra_scale=0.1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.clipped_dot(a, b, **kw)
        torch.set_num_threads(max(2, threads))
        many = ext.clipped_dot(a, b, **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert abs(many.item() - REF.clipped_dot(a, b, **kw).item()) <= (
        1e-5 * _dot_scale(a, b, x, 0.1, 0.5, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
def test_cpu_all_finite_planted(ext, dtype):
    sizes = [(1,), (7,), (4097,), (70_001,), (0,)]
    clean = [[torch.randn(s).to(dtype) for s in sizes[:3]], [torch.randn(s).to(dtype)
                                                             for s in sizes[3:]]]
    assert ext.all_finite(clean).item() is True
    assert ext.all_finite(clean).dtype == torch.bool
    for li, ti in [(0, 0), (0, 1), (0, 2), (1, 0)]:
        n = clean[li][ti].numel()
        for pos in sorted({0, n // 2, n - 1}):
            for value in (float("nan"), float("inf"), -float("inf")):
                lists = [[t.clone() for t in lst] for lst in clean]
                lists[li][ti].view(-1)[pos] = value
                assert ext.all_finite(lists).item() is False, (dtype, li, ti, pos, value)
                assert REF.all_finite(lists).item() is False


def test_cpu_all_finite_mixed_and_empty(ext):
    assert ext.all_finite([]).item() is True
    assert ext.all_finite([[], [torch.empty(0)]]).item() is True
    mixed = [[torch.randn(5, dtype=torch.bfloat16)], [torch.randn(9), torch.randn(3).double()]]
    assert ext.all_finite(mixed).item() is True
    mixed[1][1][2] = float("inf")
    assert ext.all_finite(mixed).item() is False


def _group(dtype=torch.float32, n=3):
    return make_buffers("sgd", [(n,)], dtype)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda b: setattr(b, "params", [torch.randn(4, 3).t()]), ValueError, "not contiguous"),
        (lambda b: setattr(b, "grads", [torch.randn(3).double()]), TypeError,
         r"grads\[0\] has dtype Double"),
        (lambda b: setattr(b, "tangents", [torch.randn(4)]), ValueError, "has shape"),
        (lambda b: setattr(b, "hvps", [torch.randn(3), torch.randn(3)]), ValueError,
         "hvps has 2 tensors"),
        (lambda b: setattr(b, "params", [torch.randn(3).half()]), TypeError, "not supported"),
    ],
    ids=["strided", "dtype", "shape", "hvps-length", "float16"],
)
def test_cpu_update_rejects_bad_inputs(ext, mutate, exc, match):
    bufs = _group()
    bufs.grads = [torch.randn(3)]
    mutate(bufs)
    opts = GroupOptions("sgd")
    with pytest.raises(exc, match=match):
        ext.fused_update_(opts, bufs, coeffs_for(opts, 1, 0.9))


def test_cpu_update_rejects_bad_coeffs_and_structure(ext):
    bufs = _group()
    bufs.grads = [torch.randn(3)]
    opts = GroupOptions("sgd")
    good = coeffs_for(opts, 1, 0.9)
    with pytest.raises(TypeError, match="coeffs must be float64"):
        ext.fused_update_(opts, bufs, good.float())
    with pytest.raises(ValueError, match="coeffs must be a contiguous tensor"):
        ext.fused_update_(opts, bufs, good[:4])
    with pytest.raises(ValueError, match="state lists"):
        ext.fused_update_(GroupOptions("sgdm"), bufs, good)
    with pytest.raises(ValueError, match="dynamics must be one of"):
        ext.fused_update_(GroupOptions("lamb"), bufs, good)
    with pytest.raises(ValueError, match="0 tensors in a"):
        ext.clipped_dot([], [torch.randn(3)])
    with pytest.raises(TypeError, match="floating-point"):
        ext.all_finite([[torch.zeros(3, dtype=torch.int32)]])


def test_cuda_backend_without_cuda_torch_says_why():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    with pytest.raises(_ext.ExtensionUnavailable, match="without CUDA"):
        ExtBackend("cuda", allow_jit=True)
    assert "without CUDA" in _ext.unavailable_reason("cuda")


def test_registry_builds_cpu_backend(ext):
    from marthe_ext.backends import select_backend

    backend = select_backend("cpu", torch.device("cpu"))
    assert isinstance(backend, ExtBackend) and backend.name == "cpu"


# ---------------------------------------------------------------- the CUDA launcher, emulated


@pytest.fixture(scope="module")
def emu(builds):
    if builds["emu"] is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    rc, output = builds["emu"].wait()
    assert rc == 0, output
    lib = ctypes.CDLL(str(builds["emu"].target))
    p, i64, d, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    s = ctypes.c_char_p
    lib.emulate_fused_update.restype = i64
    lib.emulate_fused_update.argtypes = [i, s, i, i, i, d, d, d, d, d, d, s, s, p, p, i64, p,
                                         i64, i]
    lib.emulate_clipped_dot.restype = d
    lib.emulate_clipped_dot.argtypes = [i, s, s, p, p, p, p, i64, d, i, i, d, i64, i,
                                        ctypes.POINTER(i64)]
    lib.emulate_all_finite.restype = i
    lib.emulate_all_finite.argtypes = [i, s, p, p, i64, i64, i]
    lib.emulate_capacity.restype = i
    lib.emulate_capacity.argtypes = [s, i, ctypes.POINTER(i64)]
    return lib


def _capacity(lib, which: str, small: int):
    """(max tensors, max blocks) per launch and the production chunk size."""
    out = (ctypes.c_int64 * 3)()
    assert lib.emulate_capacity(which.encode(), small, out) == 0
    return tuple(out)


def _ptr_array(ptrs):
    return (ctypes.c_void_p * max(1, len(ptrs)))(*ptrs)


def _numel_array(ts):
    return (ctypes.c_int64 * max(1, len(ts)))(*[t.numel() for t in ts])


def _dtype_name(dtype) -> bytes:
    return str(dtype).replace("torch.", "").encode()


def _max_launches(numels, max_tensors, max_blocks, chunk):
    nonempty = [n for n in numels if n]
    chunks = sum(-(-n // chunk) for n in nonempty)
    return -(-chunks // max_blocks) + -(-len(nonempty) // max_tensors)


# (small tables, chunk, threads, misalignment): production; tiny tables with small chunks,
# both aligned and misaligned by one element (capacities: emulate_capacity).
EMU_CONFIGS = {
    "production": (0, 0, 0, 0),
    "tiny-aligned": (1, 16, 3, 0),
    "tiny-misaligned": (1, 16, 4, 1),
}


class EmulatedCuda:
    """The Backend protocol's fused_update_ on the emulated CUDA launcher."""

    def __init__(self, lib, config):
        self.lib = lib
        self.small, self.chunk, self.threads, _ = EMU_CONFIGS[config]
        self.launches = []

    def fused_update_(self, opts, bufs, coeffs):
        n = len(bufs.params)
        none = [None] * n
        st = list(bufs.state) + [none] * (2 - len(bufs.state))
        zst = list(bufs.state_tangents) + [none] * (2 - len(bufs.state_tangents))
        rows = [bufs.params, bufs.grads, bufs.hvps or none, bufs.tangents, st[0], st[1],
                zst[0], zst[1]]
        ptrs = _ptr_array([t.data_ptr() if t is not None else None for r in rows for t in r])
        launches = self.lib.emulate_fused_update(
            self.small, opts.dynamics.encode(), int(opts.nesterov), int(bufs.hvps is not None),
            int(opts.grad_clip is not None), opts.weight_decay, opts.grad_clip or 0.0,
            opts.momentum, opts.beta1, opts.beta2, opts.eps,
            _dtype_name(bufs.params[0].dtype), _dtype_name(bufs.tangents[0].dtype), ptrs,
            _numel_array(bufs.params), n, coeffs.data_ptr(), self.chunk, self.threads)
        assert launches >= 0, "the emulation raised"
        max_t, max_b, chunk = _capacity(self.lib, "update", self.small)
        bound = _max_launches([t.numel() for t in bufs.params], max_t, max_b,
                              self.chunk or chunk)
        assert launches <= bound, (launches, bound)
        self.launches.append(launches)


@pytest.mark.parametrize("config", list(EMU_CONFIGS))
@pytest.mark.parametrize("flags", [(None, 0.0), (0.5, 0.1)], ids=["plain", "clip-wd"])
@pytest.mark.parametrize("with_hvps", [False, True], ids=["no-hvp", "hvp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_emulated_cuda_update_matches_reference(emu, case, dtype, with_hvps, flags, config):
    dynamics, nesterov = case
    clip, wd = flags
    opts = GroupOptions(dynamics=dynamics, weight_decay=wd, grad_clip=clip, nesterov=nesterov)
    bf16 = dtype == torch.bfloat16
    run_against_reference(
        EmulatedCuda(emu, config), opts, dtype, SIZES, with_hvps=with_hvps, mu=0.9,
        offset=EMU_CONFIGS[config][3], tol=1e-3 if bf16 else None,
        param_tol=2.0 ** -7 if bf16 else None)


def test_emulated_cuda_update_many_tensors_and_skip(emu):
    """More tensors than a table holds; then ok == 0 writes nothing."""
    sizes = [(int(n),) for n in torch.randint(0, 40, (60,))]
    opts = GroupOptions(dynamics="adam", weight_decay=0.1, grad_clip=0.5)
    for config in ("production", "tiny-misaligned"):
        backend = EmulatedCuda(emu, config)
        bufs = run_against_reference(backend, opts, torch.float32, sizes, with_hvps=True,
                                     mu=0.9, steps=2, offset=EMU_CONFIGS[config][3])
        assert max(backend.launches) > 1
        before = clone_buffers(bufs)
        backend.fused_update_(opts, bufs, coeffs_for(opts, 3, 0.9, ok=False))
        for (name, la), (_, lb) in zip(all_lists(bufs), all_lists(before)):
            assert all(torch.equal(a, b) for a, b in zip(la, lb)), name


@pytest.mark.parametrize("config", list(EMU_CONFIGS))
@pytest.mark.parametrize("dtypes", DOT_DTYPES, ids=DOT_IDS)
def test_emulated_cuda_clipped_dot(emu, dtypes, config):
    small, chunk, threads, offset = EMU_CONFIGS[config]
    sizes = [(1,), (7,), (0,), (4097,), (3, 5)] + [(int(n),) for n in torch.randint(0, 9, (20,))]
    for extra, clip, clip_b in [(None, None, False), (0.3, 0.5, False), (0.3, 0.5, True)]:
        a, b, x = _dot_inputs(*dtypes, sizes, extra is not None)
        a = [_alloc(t.shape, t.dtype, offset).copy_(t) for t in a]
        launches = ctypes.c_int64(0)
        got = emu.emulate_clipped_dot(
            small, _dtype_name(dtypes[0]), _dtype_name(dtypes[1]),
            _ptr_array([t.data_ptr() for t in a]), _ptr_array([t.data_ptr() for t in b]),
            None if x is None else _ptr_array([t.data_ptr() for t in x]), _numel_array(a),
            len(a), extra or 0.0, int(clip is not None), int(clip_b), clip or 0.0, chunk,
            threads, ctypes.byref(launches))
        want = REF.clipped_dot(a, b, clip=clip, a_extra=x, a_extra_scale=extra or 0.0,
                               clip_b=clip_b).item()
        tol = 1e-12 if dtypes[0] == torch.float64 else 1e-5
        assert abs(got - want) <= tol * _dot_scale(a, b, x, extra or 0.0, clip, clip_b)
        max_t, max_b, prod_chunk = _capacity(emu, "dot", small)
        assert launches.value <= _max_launches([t.numel() for t in a], max_t, max_b,
                                               chunk or prod_chunk)


@pytest.mark.parametrize("config", list(EMU_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["f32", "f64", "bf16", "f16"])
def test_emulated_cuda_all_finite(emu, dtype, config):
    small, chunk, threads, offset = EMU_CONFIGS[config]
    sizes = [(1,), (7,), (0,), (4097,)] + [(3,)] * 8
    clean = [_alloc(s, dtype, offset).copy_(torch.randn(s).to(dtype)) for s in sizes]

    def run(ts):
        r = emu.emulate_all_finite(small, _dtype_name(dtype),
                                   _ptr_array([t.data_ptr() for t in ts]), _numel_array(ts),
                                   len(ts), chunk, threads)
        assert r in (0, 1)
        return bool(r)

    assert run(clean)
    for ti in (0, 1, 3, 11):
        n = clean[ti].numel()
        for pos in sorted({0, n // 2, n - 1}):
            for value in (float("nan"), float("inf"), -float("inf")):
                ts = [_alloc(t.shape, dtype, offset).copy_(t) for t in clean]
                ts[ti].view(-1)[pos] = value
                assert not run(ts), (ti, pos, value)


# ---------------------------------------------------------------- nvcc and the CUDA binding


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else None


CU_FILES = sorted(CSRC.rglob("*.cu"))
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
CUDA_BINDING_NAME = "marthe_ext_C_cuda_linkcheck"


class Build:
    """One compiler run started in the background; ``wait()`` gives (returncode, output)."""

    def __init__(self, cmd, target: Path, log: Path):
        self.target = target
        self._log = log
        with open(log, "w") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def wait(self):
        rc = self._proc.wait()
        return rc, self._log.read_text()

    def stop(self):
        """Ends the compiler if no test waited for it (a deselected test)."""
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait()


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The slow compiles of this file, all started at once so that they share the cores:
    every .cu with nvcc (sm_80 + sm_90, warnings as errors), the CUDA binding with the host
    compiler against this torch, and the CUDA emulation library. Absent tools give None."""
    out = tmp_path_factory.mktemp("builds")
    cxx = shutil.which(_compiler())
    nvcc = _nvcc()
    started = {"nvcc": None, "binding": None, "emu": None}
    if nvcc is not None:
        started["nvcc"] = {}
        for cu in CU_FILES:
            obj = out / (cu.stem + ".o")
            cmd = [nvcc, "-c", str(cu), "-o", str(obj), "-std=c++17", f"-I{CSRC}",
                   "-Xcompiler", "-fPIC", "-Werror", "all-warnings", *cfg.NVCC_FLAGS, *GENCODE]
            started["nvcc"][cu] = Build(cmd, obj, out / (cu.stem + ".log"))
    if cxx is not None:
        emu_so = out / "cuda_emulation.so"
        started["emu"] = Build(
            [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
             f"-I{CSRC}", str(REPO / "tests" / "cuda_emulation.cpp"), "-o", str(emu_so)],
            emu_so, out / "emu.log")
    if cxx is not None and nvcc is not None:
        from torch.utils.cpp_extension import include_paths

        obj = out / "bindings_cuda.o"
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        started["binding"] = Build(
            [cxx, "-std=c++17", "-O0", "-fPIC", "-c", str(CSRC / "bindings_cuda.cpp"), "-o",
             str(obj), f"-DTORCH_EXTENSION_NAME={CUDA_BINDING_NAME}",
             "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{CSRC}",
             *[arg for p in [*include_paths(), sysconfig.get_paths()["include"]]
               for arg in ("-isystem", p)]],
            obj, out / "binding.log")
    yield started
    for build in [*(started["nvcc"] or {}).values(), started["emu"], started["binding"]]:
        if build is not None:
            build.stop()


@pytest.fixture(scope="module")
def cuda_objects(builds):
    """{.cu path: (returncode, output, object file)}."""
    if builds["nvcc"] is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    return {cu: (*b.wait(), b.target) for cu, b in builds["nvcc"].items()}


def test_there_are_cu_files():
    assert CU_FILES, "no .cu file under csrc/"


@pytest.mark.parametrize("cu", CU_FILES, ids=[str(p.relative_to(CSRC)) for p in CU_FILES])
def test_cu_compiles_for_sm80_and_sm90(cuda_objects, cu):
    rc, output, _ = cuda_objects[cu]
    assert rc == 0, f"nvcc failed on {cu.relative_to(REPO)}:\n{output}"


def test_cuda_binding_builds_links_and_imports_here(builds, cuda_objects, tmp_path):
    """The CUDA extension's host side: the binding compiled by the host compiler against this
    (CPU) torch, linked with the nvcc objects and cudart, imported. Calls with CPU tensors
    must fail in validation, before any CUDA call."""
    if builds["binding"] is None:
        pytest.skip("no C++ compiler")
    if any(rc for rc, _, _ in cuda_objects.values()):
        pytest.skip("a .cu file does not compile (see test_cu_compiles_for_sm80_and_sm90)")
    from torch.utils.cpp_extension import library_paths

    rc, output = builds["binding"].wait()
    assert rc == 0, output
    name = CUDA_BINDING_NAME
    so = tmp_path / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    link = [_nvcc(), "-shared", str(builds["binding"].target),
            *[str(o) for _, _, o in cuda_objects.values()], "-o", str(so),
            *[f"-L{p}" for p in library_paths()], "-lc10", "-ltorch", "-ltorch_cpu",
            "-ltorch_python"]
    res = subprocess.run(link, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    spec = importlib.util.spec_from_file_location(
        name, so, loader=importlib.machinery.ExtensionFileLoader(name, str(so)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert dict(module.COEFF_LAYOUT)["N_COEFFS"] == 6
    bufs = make_buffers("sgd", [(3,)], torch.float32)
    coeffs = coeffs_for(GroupOptions("sgd"), 1, 0.9)
    with pytest.raises(ValueError, match="cuda backend.*is on cpu"):
        module.fused_update("sgd", bufs.params, [torch.randn(3)], None, bufs.tangents, [], [],
                            coeffs, 0.0, None, 0.9, False, 0.9, 0.999, 1e-8, 0)
    with pytest.raises(ValueError, match="cuda backend"):
        module.clipped_dot(bufs.params, bufs.params, None, 0.0, None, False, 0)
    with pytest.raises(ValueError, match="cuda backend"):
        module.all_finite(bufs.params, 0)
