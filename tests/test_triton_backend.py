"""The Triton backend equals the torch reference (marthe_ext.backends.torch_ref).

On CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with MARTHE_GPU_TESTS=1 the same tests run the compiled kernels on CUDA tensors. The
interpreter runs one program per chunk in Python (tens of ms each), so the maths table
uses one small tensor per case and the layout tests (odd sizes, chunking, many tensors)
are separate.
"""
import math
import os

import pytest
import torch

from marthe_ext import triton_kernels
from marthe_ext.backends import load_backend
from marthe_ext.backends.api import STATE_NAMES, GroupBuffers, GroupOptions, make_coeffs
from marthe_ext.backends.torch_ref import TorchBackend
from marthe_ext.backends.triton_backend import LaunchConfig, TritonBackend

pytestmark = [
    pytest.mark.triton,
    # The interpreter runs numpy on lanes that the kernels mask off or discard.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

DEVICE = torch.device("cuda" if os.environ.get("MARTHE_GPU_TESTS") == "1" else "cpu")
RTOL = 1e-5

# (dynamics, nesterov)
DYNAMICS = [("sgd", False), ("sgdm", False), ("sgdm", True), ("adam", False), ("adamw", False)]
DYN_IDS = ["sgd", "sgdm", "nesterov", "adam", "adamw"]
CLIP = 0.5
WD = 0.1


def _opts(dynamics, nesterov=False, clip=CLIP, wd=WD):
    return GroupOptions(dynamics, weight_decay=wd, grad_clip=clip, momentum=0.9,
                        nesterov=nesterov, beta1=0.9, beta2=0.99, eps=1e-8)


def _randn(n, gen, scale=1.0, dtype=torch.float32):
    return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _fresh_grads(sizes, gen, dtype, with_hvps):
    """Gradients straddle the clip (0.5). Element 0 of every tensor has g = hz = 0 (with
    Adam's m, v, Zm planted at 0 too): a coordinate the loss never moves, where v' = 0
    and the tangent's sqrt(v') term must be taken as 0, not 0/0."""
    grads = [_randn(n, gen, 0.6, dtype) for n in sizes]
    hvps = [_randn(n, gen, 1.0, dtype) for n in sizes] if with_hvps else None
    for t in grads + (hvps or []):
        if t.numel():
            t[0] = 0
    return grads, hvps


def _make_bufs(dynamics, sizes, gen, *, param_dtype=torch.float32, state_dtype=torch.float32,
               with_hvps=True):
    grads, hvps = _fresh_grads(sizes, gen, param_dtype, with_hvps)
    state = tuple([_randn(n, gen, 0.3, state_dtype) for n in sizes]
                  for _ in STATE_NAMES[dynamics])
    state_tangents = tuple([_randn(n, gen, 0.2, state_dtype) for n in sizes]
                           for _ in STATE_NAMES[dynamics])
    if dynamics in ("adam", "adamw"):
        (m, v), (zm, _) = state, state_tangents
        for i, n in enumerate(sizes):
            v[i].abs_()
            if n:
                m[i][0] = v[i][0] = zm[i][0] = 0
    return GroupBuffers(
        params=[_randn(n, gen, 1.0, param_dtype) for n in sizes],
        grads=grads,
        hvps=hvps,
        tangents=[_randn(n, gen, 0.2, state_dtype) for n in sizes],
        state=state,
        state_tangents=state_tangents,
    )


def _clone(b: GroupBuffers) -> GroupBuffers:
    c = lambda lst: None if lst is None else [t.clone() for t in lst]
    return GroupBuffers(c(b.params), c(b.grads), c(b.hvps), c(b.tangents),
                        tuple(c(s) for s in b.state), tuple(c(s) for s in b.state_tangents))


def _clone_grads(b: GroupBuffers):
    return ([t.clone() for t in b.grads],
            None if b.hvps is None else [t.clone() for t in b.hvps])


def _named(b: GroupBuffers, dynamics):
    yield "params", b.params
    yield "tangents", b.tangents
    for name, lst in zip(STATE_NAMES[dynamics], b.state):
        yield name, lst
    for name, lst in zip(STATE_NAMES[dynamics], b.state_tangents):
        yield f"{name} tangent", lst


def _coeffs(opts, *, eta, mu, step, lr_scale=0.5, ok=True):
    f64 = lambda x: torch.tensor(x, dtype=torch.float64, device=DEVICE)
    return make_coeffs(eta=f64(eta), mu=f64(mu), lr_scale=lr_scale, step=f64(step), opts=opts,
                       ok=torch.tensor(ok, device=DEVICE))


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32 if t.element_size() == 4
                  else torch.int64).clone()


def _assert_close(got, want, dynamics, label, rtol=RTOL, param_rtol=None):
    """Every buffer, element by element, relative to the tensor's largest value."""
    for (name, xs), (_, ys) in zip(_named(got, dynamics), _named(want, dynamics)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert x.dtype == y.dtype and x.shape == y.shape
            if not y.numel():
                continue
            tol = param_rtol if (name == "params" and param_rtol) else rtol
            scale = y.abs().max().float().item()
            torch.testing.assert_close(
                x, y, rtol=tol, atol=tol * scale,
                msg=lambda m: f"{label}: {name}[{i}] differs from the torch reference\n{m}")


def _run_both(dynamics, nesterov, sizes, *, clip, wd, with_hvps, mu, steps=3, backend=None,
              param_dtype=torch.float32, state_dtype=torch.float32, rtol=RTOL, param_rtol=None,
              seed=0):
    """Drive both backends from the same start for ``steps`` calls (state carried, fresh
    gradients every call) and compare every buffer after each call."""
    gen = torch.Generator().manual_seed(seed)
    opts = _opts(dynamics, nesterov, clip, wd)
    ours = _make_bufs(dynamics, sizes, gen, param_dtype=param_dtype, state_dtype=state_dtype,
                      with_hvps=with_hvps)
    ref = _clone(ours)
    tb, rb = backend or TritonBackend(), TorchBackend()
    for k, eta in enumerate((0.05, 0.1, 0.02)[:steps], start=1):
        if k > 1:
            ours.grads, ours.hvps = _fresh_grads(sizes, gen, param_dtype, with_hvps)
            ref.grads, ref.hvps = _clone_grads(ours)
        coeffs = _coeffs(opts, eta=eta, mu=mu, step=k)
        tb.fused_update_(opts, ours, coeffs)
        rb.fused_update_(opts, ref, coeffs)
        _assert_close(ours, ref, dynamics, f"{dynamics} step {k}", rtol, param_rtol)


@pytest.mark.parametrize("mu", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("with_hvps", [False, True], ids=["hz0", "hvp"])
@pytest.mark.parametrize("wd", [0.0, WD], ids=["wd0", "wd"])
@pytest.mark.parametrize("clip", [None, CLIP], ids=["noclip", "clip"])
@pytest.mark.parametrize("dynamics,nesterov", DYNAMICS, ids=DYN_IDS)
def test_fused_update_matches_reference(dynamics, nesterov, clip, wd, with_hvps, mu):
    _run_both(dynamics, nesterov, [37, 0], clip=clip, wd=wd, with_hvps=with_hvps, mu=mu)


@pytest.mark.parametrize("dynamics,nesterov", DYNAMICS, ids=DYN_IDS)
def test_odd_sizes_full_and_tail_chunks(dynamics, nesterov):
    # Interpreter default: 2048-element chunks, so 4097 = two full chunks and a tail.
    _run_both(dynamics, nesterov, [1, 7, 4097, 0], clip=CLIP, wd=WD, with_hvps=True, mu=0.9,
              steps=2)


@pytest.mark.parametrize("dynamics,nesterov", [("sgdm", True), ("adamw", False)],
                         ids=["nesterov", "adamw"])
def test_unrolled_blocks_and_many_chunks(dynamics, nesterov):
    # 48-element chunks of three 16-element blocks: tail-only, exactly full, full + tail.
    backend = TritonBackend(LaunchConfig(block=16, unroll=3, num_warps=1))
    _run_both(dynamics, nesterov, [1, 47, 48, 49, 100, 0], clip=CLIP, wd=WD, with_hvps=True,
              mu=0.9, steps=2, backend=backend)


def test_many_tiny_tensors():
    sizes = [1 + i % 5 for i in range(200)]
    _run_both("sgd", False, sizes, clip=CLIP, wd=WD, with_hvps=True, mu=0.9, steps=1)


# (dynamics, nesterov, param dtype, one ulp relative at most)
LOW_PRECISION = ([(d, n, torch.bfloat16, 2 ** -7) for d, n in DYNAMICS]
                 + [("sgdm", True, torch.float16, 2 ** -10),
                    ("adam", False, torch.float16, 2 ** -10)])


@pytest.mark.parametrize("dynamics,nesterov,param_dtype,ulp", LOW_PRECISION,
                         ids=[f"{i}-bf16" for i in DYN_IDS] + ["nesterov-f16", "adam-f16"])
def test_low_precision_params_float32_state(dynamics, nesterov, param_dtype, ulp):
    # Same float32 maths and round-to-nearest-even on store: params may differ by one
    # ulp where float32 values straddle a rounding boundary (the CPU reference's sqrt is
    # not correctly rounded); no weight decay, so state and tangents do not see it.
    _run_both(dynamics, nesterov, [7, 300], clip=CLIP, wd=0.0, with_hvps=True, mu=0.9, steps=2,
              param_dtype=param_dtype, param_rtol=ulp)


def test_bfloat16_conversions_are_exact_round_to_nearest_even():
    # Tensor 0: every finite sign/exponent with a few mantissas, subnormals included,
    # must come back unchanged (w - eta * 0). Tensor 1: 1 + k 2**-8 lands halfway
    # between bfloat16 neighbours for odd k; ties go to the even mantissa, as in torch.
    bits = torch.tensor([s | e << 7 | m for s in (0, 0x8000) for e in range(255)
                         for m in (0, 1, 0x40, 0x7F)], dtype=torch.int32).to(torch.int16)
    w0 = bits.view(torch.bfloat16).clone().to(DEVICE)
    k = torch.arange(-20, 21, dtype=torch.float32)
    w1 = torch.ones(k.numel(), dtype=torch.bfloat16, device=DEVICE)
    g0 = torch.zeros_like(w0)
    g1 = (-k * 2 ** -8).to(torch.bfloat16).to(DEVICE)
    opts = GroupOptions("sgd", grad_clip=None)
    bufs = GroupBuffers([w0, w1], [g0, g1], None, [torch.zeros(w.numel(), device=DEVICE)
                                                  for w in (w0, w1)])
    ref = _clone(bufs)
    coeffs = _coeffs(opts, eta=1.0, mu=0.0, step=1, lr_scale=1.0)
    TritonBackend().fused_update_(opts, bufs, coeffs)
    TorchBackend().fused_update_(opts, ref, coeffs)
    assert torch.equal(_bits(bufs.params[0]).cpu(), bits)
    assert torch.equal(_bits(bufs.params[1]), _bits(ref.params[1]))


@pytest.mark.parametrize("dynamics,nesterov", DYNAMICS, ids=DYN_IDS)
def test_float64(dynamics, nesterov):
    _run_both(dynamics, nesterov, [7, 33], clip=CLIP, wd=WD, with_hvps=True, mu=0.9, steps=2,
              param_dtype=torch.float64, state_dtype=torch.float64, rtol=1e-12)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dynamics,nesterov", DYNAMICS, ids=DYN_IDS)
def test_not_ok_leaves_every_buffer_bit_identical(dynamics, nesterov, param_dtype):
    gen = torch.Generator().manual_seed(1)
    sizes = [7, 4097, 0]
    bufs = _make_bufs(dynamics, sizes, gen, param_dtype=param_dtype)
    bufs.grads[1][5] = float("nan")  # a skipped step usually has non-finite gradients
    bufs.grads[0][2] = float("inf")
    lists = [bufs.params, bufs.grads, bufs.hvps, bufs.tangents, *bufs.state, *bufs.state_tangents]
    before = [[_bits(t) for t in lst] for lst in lists]
    opts = _opts(dynamics, nesterov)
    TritonBackend().fused_update_(opts, bufs, _coeffs(opts, eta=0.1, mu=0.9, step=4, ok=False))
    for lst, old in zip(lists, before):
        for t, o in zip(lst, old):
            assert torch.equal(_bits(t), o)


@pytest.mark.parametrize("extra", [False, True], ids=["a", "a+extra"])
@pytest.mark.parametrize("clip,clip_b", [(None, False), (0.5, False), (0.5, True)],
                         ids=["noclip", "clip", "clip_b"])
@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float64, torch.float64)],
                         ids=["f32", "bf16-f32", "f64"])
def test_clipped_dot_matches_reference(a_dtype, b_dtype, clip, extra, clip_b):
    gen = torch.Generator().manual_seed(2)
    sizes = [1, 7, 4097, 0]
    a = [_randn(n, gen, 1.0, a_dtype) for n in sizes]
    b = [_randn(n, gen, 1.0, b_dtype) for n in sizes]
    kw = dict(clip=clip, clip_b=clip_b)
    if extra:
        kw.update(a_extra=[_randn(n, gen, 1.0, a_dtype) for n in sizes], a_extra_scale=0.3)
    got = TritonBackend().clipped_dot(a, b, **kw)
    want = TorchBackend().clipped_dot(a, b, **kw)
    assert got.dtype == want.dtype and got.shape == () and got.device == DEVICE
    # Summation order differs; bound the error by the sum of |terms|.
    ext = kw.get("a_extra", a)
    terms = sum(((x.double().abs() + 0.3 * e.double().abs()) * y.double().abs()).sum().item()
                for x, e, y in zip(a, ext, b))
    tol = 1e-12 if a_dtype == torch.float64 else 1e-5
    assert abs(got.item() - want.item()) <= tol * terms


def test_clipped_dot_beyond_float32_range_is_inf_as_the_reference():
    """A diverging run's float32 sum past float32's range: +-inf like the reference's (the
    compiled CPU backend raised here; test_ext_backend)."""
    for sign in (1.0, -1.0):
        a = [torch.full((3,), 3e38, device=DEVICE), torch.full((2,), 2e38, device=DEVICE)]
        b = [torch.full((3,), sign, device=DEVICE), torch.full((2,), sign, device=DEVICE)]
        got, want = TritonBackend().clipped_dot(a, b), TorchBackend().clipped_dot(a, b)
        assert got.item() == want.item() == sign * math.inf


def test_clipped_dot_empty():
    tb, rb = TritonBackend(), TorchBackend()
    assert tb.clipped_dot([], []).item() == rb.clipped_dot([], []).item() == 0
    empty = [torch.zeros(0, device=DEVICE)]
    assert tb.clipped_dot(empty, empty, clip=1.0).item() == 0


def test_all_finite_matches_reference():
    tb, rb = TritonBackend(), TorchBackend()
    gen = torch.Generator().manual_seed(3)
    sizes = [1, 7, 4097, 0]

    def fresh():
        return ([_randn(n, gen) for n in sizes],
                [_randn(n, gen, 1.0, torch.bfloat16) for n in sizes],
                [_randn(n, gen, 1.0, torch.float64) for n in sizes])

    lists = fresh()
    assert tb.all_finite(lists).item() is True
    assert tb.all_finite(lists).device == DEVICE
    plants = [(0, 2, 100, float("nan")),    # inside a full chunk
              (0, 2, 4096, float("inf")),   # the last element, in the tail chunk
              (0, 0, 0, -float("inf")),     # a one-element tensor
              (1, 2, 4000, float("inf")),   # bfloat16
              (1, 1, 3, float("nan")),
              (2, 2, 2047, -float("inf"))]  # float64
    for li, ti, ei, value in plants:
        lists = fresh()
        lists[li][ti][ei] = value
        got, want = tb.all_finite(lists), rb.all_finite(lists)
        assert got.dtype == torch.bool and got.shape == ()
        assert got.item() is want.item() is False, (li, ti, ei, value)
    # Finite extremes are finite.
    lists = fresh()
    lists[1][1][0] = torch.finfo(torch.bfloat16).max
    lists[0][2][5] = -torch.finfo(torch.float32).max
    assert tb.all_finite(lists).item() is rb.all_finite(lists).item() is True


def test_all_finite_empty():
    tb = TritonBackend()
    assert tb.all_finite([]).item() is True
    assert tb.all_finite([[], []]).item() is True
    assert tb.all_finite([[torch.zeros(0, device=DEVICE)]]).item() is True


def test_empty_group_is_a_no_op(launches):
    """A group none of whose parameters got a gradient: its lists are still checked, then
    nothing happens (no launch, no pointer table, the coefficients untouched)."""
    opts = _opts("adam")
    tb = TritonBackend()
    coeffs = _coeffs(opts, eta=0.1, mu=0.9, step=1)
    saved = coeffs.clone()
    assert tb.fused_update_(opts, GroupBuffers([], [], None, [], ([], []), ([], [])), coeffs) is None
    assert launches == [] and tb.tables_built == 0 and torch.equal(coeffs, saved)
    with pytest.raises(ValueError, match="grads has 1 tensors, params has 0"):
        tb.fused_update_(opts, GroupBuffers([], [torch.zeros(2, device=DEVICE)], None, [], ([], []), ([], [])),
                         coeffs)
    with pytest.raises(ValueError, match="state list"):
        tb.fused_update_(opts, GroupBuffers([], [], None, [], ([],), ([],)), coeffs)


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches, without running them (only the launcher logic is tested)."""
    calls = []
    kernel_type = type(triton_kernels._sgd_update_kernel)
    monkeypatch.setattr(kernel_type, "run",
                        lambda self, *args, grid, warmup, **kw: calls.append(grid))
    return calls


@pytest.mark.parametrize("n_tensors", [10, 300])
@pytest.mark.parametrize("dynamics,nesterov", DYNAMICS, ids=DYN_IDS)
def test_launch_count_is_bounded(launches, dynamics, nesterov, n_tensors):
    gen = torch.Generator().manual_seed(4)
    sizes = [3 if i % 2 else 2100 for i in range(n_tensors)]  # both full and tail chunks
    bufs = _make_bufs(dynamics, sizes, gen)
    opts = _opts(dynamics, nesterov)
    tb = TritonBackend()
    tb.fused_update_(opts, bufs, _coeffs(opts, eta=0.1, mu=0.9, step=1))
    assert len(launches) == 2
    launches.clear()
    tb.clipped_dot(bufs.grads, bufs.tangents, clip=CLIP, a_extra=bufs.params, a_extra_scale=WD)
    assert len(launches) == 2
    launches.clear()
    tb.all_finite([bufs.grads, bufs.hvps, bufs.params])
    assert len(launches) == 2


def test_tables_are_cached_and_fresh_grads_handled():
    gen = torch.Generator().manual_seed(5)
    sizes = [7, 4097]
    opts = _opts("adam")
    bufs = _make_bufs("adam", sizes, gen)
    ref = _clone(bufs)
    tb, rb = TritonBackend(), TorchBackend()
    first_grads, first_hvps = bufs.grads, bufs.hvps
    for k in range(1, 4):
        if k == 2:
            bufs.grads, bufs.hvps = _fresh_grads(sizes, gen, torch.float32, True)
        if k == 3:  # back to the first step's tensors: their rows are still cached
            bufs.grads, bufs.hvps = first_grads, first_hvps
        ref.grads, ref.hvps = _clone_grads(bufs)
        before = tb.tables_built
        coeffs = _coeffs(opts, eta=0.1, mu=0.9, step=k)
        tb.fused_update_(opts, bufs, coeffs)
        rb.fused_update_(opts, ref, coeffs)
        _assert_close(bufs, ref, "adam", f"step {k}")
        built = tb.tables_built - before
        # step 1: 8 rows + layout + hyper; step 2: new grads and hvps rows; step 3: none
        assert built == {1: 10, 2: 2, 3: 0}[k], (k, built)


def test_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(6)
    opts = _opts("sgdm")
    coeffs = _coeffs(opts, eta=0.1, mu=0.9, step=1)
    tb = TritonBackend()

    bufs = _make_bufs("sgdm", [12], gen)
    bufs.params = [torch.randn(4, 3, device=DEVICE).t()]
    with pytest.raises(ValueError, match=r"params\[0\] is not contiguous"):
        tb.fused_update_(opts, bufs, coeffs)

    bufs = _make_bufs("sgdm", [12], gen)
    tb.fused_update_(opts, bufs, coeffs)
    # Same address and size as the cached row, but a transposed view: still caught.
    bufs.grads = [bufs.grads[0].view(4, 3).t()]
    with pytest.raises(ValueError, match=r"grads\[0\] is not contiguous"):
        tb.fused_update_(opts, bufs, coeffs)

    bufs = _make_bufs("sgdm", [12, 5], gen)
    bufs.tangents = bufs.tangents[:1]
    with pytest.raises(ValueError, match="tangents has 1 tensors"):
        tb.fused_update_(opts, bufs, coeffs)

    bufs = _make_bufs("sgdm", [12, 5], gen)
    bufs.grads = [bufs.grads[0], torch.zeros(6, device=DEVICE)]
    with pytest.raises(ValueError, match="grads and params differ in size at index 1"):
        tb.fused_update_(opts, bufs, coeffs)

    bufs = _make_bufs("sgdm", [12], gen)
    bufs.tangents = [bufs.tangents[0].to(torch.bfloat16)]
    with pytest.raises(TypeError, match="float32 or all float64"):
        tb.fused_update_(opts, bufs, coeffs)

    bufs = _make_bufs("sgdm", [12], gen)
    with pytest.raises(TypeError, match="coeffs must be a float64 tensor"):
        tb.fused_update_(opts, bufs, coeffs.float())

    bufs = _make_bufs("sgdm", [12, 5], gen)
    bufs.params = [bufs.params[0], bufs.params[1].double()]
    with pytest.raises(TypeError, match="params mixes dtypes"):
        tb.fused_update_(opts, bufs, coeffs)

    with pytest.raises(ValueError, match="state list"):
        tb.fused_update_(_opts("adam"), _make_bufs("sgdm", [3], gen), coeffs)

    with pytest.raises(ValueError, match="not contiguous"):
        tb.clipped_dot([torch.randn(4, 3, device=DEVICE).t()], [torch.randn(3, 4, device=DEVICE)])


def test_selected_by_name():
    assert load_backend("triton").name == "triton"


_GPU_COMPILE_CHECK = r"""
import re
import triton.language as tl
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from marthe_ext.triton_kernels import fused_update, reductions

def ptx(fn, consts, out="*fp32"):
    ptr = {"coeffs": "*fp64", "hyper": "*fp64", "consts": "*fp64", "out": out}
    sig = {a: "constexpr" if a in consts else ptr.get(a, "*i64") for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return compile(src, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 8, "enable_fp_fusion": False}).asm["ptx"]

flags = dict(HAS_HZ=True, HAS_WD=True, HAS_CLIP=True, BLOCK=1024, UNROLL=4)
adam = ptx(fused_update._adam_update_kernel,
           dict(flags, W_DT=tl.bfloat16, G_DT=tl.bfloat16, H_DT=tl.bfloat16, C_DT=tl.float32,
                DECOUPLED=True, MASKED=False, ALIGN=16))
assert "ld.global.v4.b32" in adam and "st.global.v4.b32" in adam, "full chunks not vectorised"
assert "div.rn.f32" in adam and "sqrt.rn.f32" in adam
assert not re.search(r"\bfma\.|div\.full|div\.approx|sqrt\.approx", adam)
ptx(fused_update._sgdm_update_kernel,
    dict(flags, W_DT=tl.float64, G_DT=tl.float64, H_DT=tl.float64, C_DT=tl.float64,
         NESTEROV=True, MASKED=True, ALIGN=1))
ptx(reductions._clipped_dot_kernel,
    dict(A_DT=tl.bfloat16, B_DT=tl.float32, E_DT=tl.bfloat16, ACC_DT=tl.float32,
         HAS_EXTRA=True, HAS_CLIP=True, CLIP_B=True, MASKED=False, ALIGN=16, BLOCK=1024,
         UNROLL=4))
ptx(reductions._all_finite_kernel,
    dict(X_DT=tl.float64, F_DT=tl.float64, MASKED=True, ALIGN=1, BLOCK=1024, UNROLL=4),
    out="*i32")
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the GPU run compiles for real")
def test_kernels_compile_for_sm90():
    """Ahead-of-time compilation for an H100/H200 (no GPU needed, ptxas ships with
    Triton): the kernels build, full chunks use 16-byte vector accesses, and division
    and square root are IEEE with no fused multiply-adds, like the torch reference."""
    import subprocess
    import sys
    from pathlib import Path

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _GPU_COMPILE_CHECK], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
