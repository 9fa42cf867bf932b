"""Property-based tests (hypothesis) of every backend against the torch reference.

Drawn at random (derandomised, a bounded number of examples per property, so the run
is the same every time and fits CI): the dynamics and options (nesterov, weight decay,
clip, HVPs or none, mu), the dtypes (float32; bfloat16 params with float32 state;
float64), the shapes (empty, 1, primes, 2^k +- 1, many tiny tensors, sizes straddling
the backend's chunk/launch boundaries) and the values (1e30, subnormals, exact zeros in
Adam's second moment with a zero gradient, +-inf and NaN in one element).

* the fast backends (CPU extension, Triton under TRITON_INTERPRET=1) equal the torch
  reference (``TorchBackend``) on the weights and every state and tangent tensor;
* every backend (torch too) finds every non-finite element (``all_finite``), computes
  ``clipped_dot`` to float32 accumulation accuracy against an exact float64 sum, leaves
  every buffer bit-identical when the step is not applied, and handles non-contiguous
  tensors or rejects them with an error naming contiguity;
* through ``Marthe``: one +-inf/NaN in one gradient element skips the step with nothing
  changed, on every backend.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import marthe_ext
from marthe_ext import _ext
from marthe_ext.backends.api import STATE_NAMES, GroupBuffers, GroupOptions, make_coeffs
from marthe_ext.backends.torch_ref import TorchBackend

pytestmark = [
    # The Triton interpreter runs numpy on lanes the kernels mask off or discard.
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:marthe_ext. a step was skipped:RuntimeWarning"),
]

REF = TorchBackend()
FUZZ = settings(max_examples=int(os.environ.get("MARTHE_FUZZ_EXAMPLES", "12")),
                derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
DYNAMICS = [("sgd", False), ("sgdm", False), ("sgdm", True), ("adam", False), ("adamw", False)]
# (param dtype, state dtype): low-precision params keep float32 state and tangents.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
          (torch.float64, torch.float64)]
TINY = {torch.float32: 1e-40, torch.bfloat16: 1e-40, torch.float64: 1e-310}  # subnormals
PRIMES = [2, 3, 7, 31, 127, 257, 1021]
POW2 = [2 ** k + d for k in (4, 6, 8, 10) for d in (-1, 1)]


# ------------------------------------------------------------------ the backends

def _triton():
    from marthe_ext.backends.triton_backend import LaunchConfig, TritonBackend
    # Small chunks: the interpreter runs one Python program per chunk, and small chunks
    # put the chunk and launch boundaries (full chunks vs the masked tail) in reach.
    return TritonBackend(config=LaunchConfig(block=32, unroll=2, num_warps=1))


def _cpu():
    from marthe_ext.backends.ext_backend import ExtBackend
    try:
        return ExtBackend("cpu", allow_jit=True)
    except _ext.ExtensionUnavailable as exc:
        pytest.skip(f"CPU extension unavailable: {exc}")


# name -> (factory, chunk/launch boundaries, most tensors per example, largest tensor)
BACKENDS = {
    "torch": (TorchBackend, (), 1000, 5000),
    "cpu": (_cpu, (1 << 14, 1 << 16), 1000, 70000),  # kSpan, kMinParallel (csrc/cpu)
    "triton": (_triton, (64, 128), 40, 300),
}
FAST = ["cpu", "triton"]


@pytest.fixture(scope="module", params=list(BACKENDS))
def any_backend(request):
    return request.param, BACKENDS[request.param][0]()


@pytest.fixture(scope="module", params=FAST)
def fast_backend(request):
    return request.param, BACKENDS[request.param][0]()


# ------------------------------------------------------------------ strategies

@st.composite
def sizes(draw, name):
    """A list of tensor sizes for ``name``: odd, empty, boundary-straddling or many tiny."""
    _, bounds, most, largest = BACKENDS[name]
    edge = [b + d for b in bounds for d in (-1, 0, 1)]
    one = st.sampled_from([0, 1, *PRIMES, *POW2, *edge])
    kind = draw(st.sampled_from(["few", "few", "many"]))
    if kind == "many":
        return [draw(st.integers(0, 3)) for _ in range(most)]
    out = draw(st.lists(one, min_size=1, max_size=4))
    while sum(out) > 2 * largest:
        out.pop()
    return out or [1]


@st.composite
def update_case(draw, name):
    dynamics, nesterov = draw(st.sampled_from(DYNAMICS))
    opts = GroupOptions(dynamics, weight_decay=draw(st.sampled_from([0.0, 0.1])),
                        grad_clip=draw(st.sampled_from([None, 0.5, 1e3])), momentum=0.9,
                        nesterov=nesterov, beta1=0.9, beta2=draw(st.sampled_from([0.99, 0.999])),
                        eps=draw(st.sampled_from([1e-8, 1e-3])))
    return dict(opts=opts, dtypes=draw(st.sampled_from(DTYPES)), sizes=draw(sizes(name)),
                hvps=draw(st.booleans()), mu=draw(st.sampled_from([0.0, 0.9, 1.0])),
                step=draw(st.integers(1, 5)), seed=draw(st.integers(0, 2 ** 16)),
                special=draw(st.sampled_from([None, "huge", "subnormal", "adam_zero"])),
                where=draw(st.integers(0, 10 ** 6)))


def _make(case) -> GroupBuffers:
    """Random buffers for ``case``; ``special`` plants one odd value (same place in
    every tensor it touches) in the first non-empty tensor."""
    p_dt, s_dt = case["dtypes"]
    gen = torch.Generator().manual_seed(case["seed"])
    names = STATE_NAMES[case["opts"].dynamics]

    def rnd(n, dt, scale=1.0, positive=False):
        x = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        return (x.abs() if positive else x).to(dt)

    ns = case["sizes"]
    b = GroupBuffers(
        params=[rnd(n, p_dt) for n in ns], grads=[rnd(n, p_dt, 0.6) for n in ns],
        hvps=[rnd(n, p_dt) for n in ns] if case["hvps"] else None,
        tangents=[rnd(n, s_dt, 0.2) for n in ns],
        state=tuple([rnd(n, s_dt, 0.3, positive=name == "exp_avg_sq") for n in ns]
                    for name in names),
        state_tangents=tuple([rnd(n, s_dt, 0.2) for n in ns] for _ in names))
    hit = next((i for i, n in enumerate(ns) if n), None)
    special = case["special"]
    if hit is None or special is None:
        return b
    j = case["where"] % ns[hit]
    if special == "huge":
        b.grads[hit][j] = 1e30
        b.params[hit][j] = -1e30
    elif special == "subnormal":
        for lst in (b.params, b.grads, b.tangents, *b.state, *b.state_tangents):
            lst[hit][j] = TINY[lst[hit].dtype]
    elif special == "adam_zero" and names:
        # a coordinate the loss never moves: g = 0 and v' = 0 exactly
        b.grads[hit][j] = 0
        for lst in b.state:
            lst[hit][j] = 0
    return b


def _clone(b: GroupBuffers) -> GroupBuffers:
    c = lambda lst: None if lst is None else [t.clone() for t in lst]  # noqa: E731
    return GroupBuffers(c(b.params), c(b.grads), c(b.hvps), c(b.tangents),
                        tuple(c(s) for s in b.state), tuple(c(s) for s in b.state_tangents))


def _outputs(b: GroupBuffers):
    yield "params", b.params
    yield "tangents", b.tangents
    for i, lst in enumerate(b.state):
        yield f"state[{i}]", lst
    for i, lst in enumerate(b.state_tangents):
        yield f"state_tangents[{i}]", lst


def _coeffs(case, ok=True):
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return make_coeffs(eta=f64(0.05), mu=f64(case["mu"]), lr_scale=0.7,
                       step=f64(float(case["step"])), opts=case["opts"], ok=torch.tensor(ok))


def _assert_close(got, want, what, rtol):
    """Elementwise |got - want| <= rtol (|want| + scale), scale = the tensor's largest
    ordinary value; infinities must match exactly, NaN where the reference has NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if not want.numel():
        return
    g, w = got.double(), want.double()
    ordinary = w[torch.isfinite(w) & (w.abs() < 1e20)].abs()
    scale = ordinary.max().item() if ordinary.numel() else 1.0
    torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


# ------------------------------------------------------------------ properties

@given(data=st.data())
@settings(FUZZ, max_examples=2 * FUZZ.max_examples)
def test_fused_update_matches_reference(fast_backend, data):
    name, backend = fast_backend
    case = data.draw(update_case(name))
    ref = _make(case)
    got = _clone(ref)
    coeffs = _coeffs(case)
    REF.fused_update_(case["opts"], ref, coeffs)
    backend.fused_update_(case["opts"], got, coeffs)
    p_dt, s_dt = case["dtypes"]
    rtol = 1e-12 if s_dt == torch.float64 else 1e-5
    for (what, xs), (_, ys) in zip(_outputs(got), _outputs(ref)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            # bfloat16 weights: the float32 results may round to neighbouring bf16 values
            tol = 2 ** -7 if x.dtype == torch.bfloat16 else rtol
            _assert_close(x, y, f"{name} {what}[{i}] (n={y.numel()})", tol)


@given(data=st.data())
@FUZZ
def test_skipped_update_leaves_every_bit(any_backend, data):
    """ok = 0 (a non-finite step): nothing changes, NaN payloads included."""
    name, backend = any_backend
    case = data.draw(update_case(name))
    b = _make(case)
    for lst in (b.grads, b.hvps or []):
        for t in lst:
            if t.numel():
                t[case["where"] % t.numel()] = data.draw(
                    st.sampled_from([math.inf, -math.inf, math.nan]))
    before = _clone(b)
    backend.fused_update_(case["opts"], b, _coeffs(case, ok=False))
    for (what, xs), (_, ys) in zip(_outputs(b), _outputs(before)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert torch.equal(_bits(x), _bits(y)), f"{name}: {what}[{i}] changed"


@given(data=st.data())
@FUZZ
def test_all_finite_finds_every_bad_element(any_backend, data):
    name, backend = any_backend
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16,
                                       torch.float64]))
    ns = data.draw(sizes(name))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    ts = [(torch.randn(n, generator=gen) * 1e3).to(dtype) for n in ns]
    bad = data.draw(st.sampled_from([None, math.inf, -math.inf, math.nan, 1e30, TINY[
        torch.float32]]))
    live = [t for t in ts if t.numel()]
    if bad is not None and live:
        t = live[data.draw(st.integers(0, len(live) - 1))]
        t[data.draw(st.integers(0, t.numel() - 1))] = bad
    want = all(bool(torch.isfinite(t).all()) for t in ts)
    split = data.draw(st.integers(0, len(ts)))
    assert bool(backend.all_finite([ts[:split], ts[split:]])) == want, (name, bad, dtype)


@given(data=st.data())
@FUZZ
def test_clipped_dot_matches_exact_sum(any_backend, data):
    name, backend = any_backend
    p_dt, s_dt = data.draw(st.sampled_from(DTYPES))
    ns = data.draw(sizes(name))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    a = [torch.randn(n, generator=gen).to(p_dt) for n in ns]
    b = [torch.randn(n, generator=gen).to(s_dt) for n in ns]
    extra = [torch.randn(n, generator=gen).to(p_dt) for n in ns]
    clip = data.draw(st.sampled_from([None, 0.5]))
    scale = data.draw(st.sampled_from([0.0, 0.1]))
    clip_b = data.draw(st.booleans())
    got = backend.clipped_dot(a, b, clip=clip, a_extra=extra if scale else None,
                              a_extra_scale=scale, clip_b=clip_b)
    terms = []
    for x, y, e in zip(a, b, extra):
        x, y = x.double(), y.double()
        if scale:
            # the extra term is formed in the compute dtype, as the kernels do
            acc = torch.float64 if p_dt == torch.float64 else torch.float32
            x = (x.to(acc) + e.to(acc) * scale).double()
        if clip is not None:
            x = x.clamp(-clip, clip)
            y = y.clamp(-clip, clip) if clip_b else y
        terms.append(x * y)
    flat = torch.cat(terms) if terms else torch.zeros(0, dtype=torch.float64)
    exact, mass = flat.sum().item(), flat.abs().sum().item()
    eps = 1e-13 if p_dt == torch.float64 else 1e-5
    assert abs(float(got) - exact) <= eps * mass + 1e-30, (name, float(got), exact, mass)


@given(data=st.data())
@settings(FUZZ, max_examples=4)
def test_non_contiguous_views_handled_or_rejected(any_backend, data):
    name, backend = any_backend
    case = data.draw(update_case(name))
    case["sizes"] = [n for n in case["sizes"] if n] or [5]
    ref = _make(case)
    strided = _clone(ref)
    which = data.draw(st.sampled_from(["params", "grads", "tangents"]))
    lst = getattr(strided, which)
    # the same values, seen through a stride-2 view
    lst[0] = torch.zeros(2 * lst[0].numel(), dtype=lst[0].dtype)[::2].copy_(lst[0])
    coeffs = _coeffs(case)
    REF.fused_update_(case["opts"], ref, coeffs)
    try:
        backend.fused_update_(case["opts"], strided, coeffs)
    except (ValueError, TypeError) as e:
        assert "contiguous" in str(e), f"{name}: unclear error for a strided {which}: {e}"
        return
    for (what, xs), (_, ys) in zip(_outputs(strided), _outputs(ref)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            tol = 2 ** -7 if x.dtype == torch.bfloat16 else 1e-5
            _assert_close(x, y, f"{name} strided {which}: {what}[{i}]", tol)


# ------------------------------------------------------------------ through Marthe

@given(data=st.data())
@settings(FUZZ, max_examples=6)
def test_one_non_finite_gradient_element_skips_the_step(any_backend, data):
    name, _ = any_backend
    dynamics, nesterov = data.draw(st.sampled_from(DYNAMICS))
    safeguards = data.draw(st.sampled_from(["robust", None]))
    bad = data.draw(st.sampled_from([math.inf, -math.inf, math.nan]))
    torch.manual_seed(data.draw(st.integers(0, 100)))
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, dynamics=dynamics,
                            nesterov=nesterov, backend=name, safeguards=safeguards,
                            hyper_lr=1e-3 if safeguards else 1e-6, weight_decay=0.01)
    x, y = torch.randn(8, 5), torch.randint(0, 2, (8,))
    loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    opt.step(loss)
    opt.step(loss)  # state, tangents and eta all moved off their initial values
    params = list(model.parameters())
    target = params[data.draw(st.integers(0, len(params) - 1))]
    index = data.draw(st.integers(0, target.numel() - 1))

    def poisoned():
        # a finite loss whose gradient is ordinary except target[index]'s, which is bad
        return loss() + _grad_is(target.reshape(-1)[index], bad)

    before = ([p.detach().clone() for p in params],
              {k: v.clone() for k, v in opt.hyper_state().items()},
              [{k: v.clone() for k, v in opt.state[p].items()} for p in params])
    skipped = opt.skipped_steps
    opt.step(poisoned)
    assert opt.skipped_steps == skipped + 1, name
    for p, q in zip(params, before[0]):
        assert torch.equal(_bits(p.detach()), _bits(q)), name
    after = opt.hyper_state()
    for k, v in before[1].items():
        if k not in ("skipped", "last_hypergrad"):  # the counter and the report of this h
            assert torch.equal(after[k], v), (name, k)
    for p, st_before in zip(params, before[2]):
        for k, v in st_before.items():
            assert torch.equal(_bits(opt.state[p][k]), _bits(v)), (name, k)


class _GradIs(torch.autograd.Function):
    """Adds nothing to the loss; its gradient with respect to ``x`` is ``value``."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return torch.zeros((), dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


def _grad_is(x, value):
    return _GradIs.apply(x, value)
