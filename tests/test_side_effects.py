"""No silent side effects, no unscoped process-wide state (issue 17).

A step counts once: module buffers (BatchNorm running statistics) and the random
generators end where one evaluation of the closure leaves them, whatever the HVP engine,
the hypergradient mode or an HVP closure evaluated besides. Process-wide switches (TF32,
PATH) are scoped and restored, also across threads; per-optimizer state (the Triton
backend's table cache) is per optimizer; a backend loader's bug is not mistaken for an
unavailable backend.
"""
from __future__ import annotations

import copy
import os
import threading

import pytest
import torch
from torch import nn

import marthe_ext
from marthe_ext import _ext
from marthe_ext import backends
from marthe_ext.backends import select_backend
from marthe_ext.backends.api import STATE_NAMES, GroupBuffers, GroupOptions, make_coeffs
from marthe_ext.hypergrad import fd_hypergrad
from marthe_ext.hvp import ENGINES, exact_float32, restored_buffers, time_engines

F64 = torch.float64
CPU = torch.device("cpu")
WAIT = 10  # seconds: bounds every wait on another thread, so a failing test still ends


def bn_net():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def dropout_net():
    return nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3)).double()


def data(n=8):
    return torch.randn(n, 4, dtype=F64), torch.randint(0, 3, (n,))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------- module buffers
@pytest.mark.parametrize("how", ["fd", "hvp_closure", "auto"])
def test_an_hvp_step_without_model_moves_batchnorm_statistics_once(how, one_thread):
    """Neither the fd probe nor an HVP closure counts as a training step, model= or not:
    the running statistics equal those of a plain forward pass per step."""
    model = bn_net()
    plain = copy.deepcopy(model)
    x, y = data()
    hvp = "fd" if how == "fd" else "auto" if how == "auto" else "reverse"
    opt = marthe_ext.Marthe(model.parameters(), lr=0.1, mu=0.9, hvp=hvp)
    loss = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    for _ in range(3):  # steps 2 and 3 take an HVP
        with torch.no_grad():  # the plain twin sees the same weights, keeps its own buffers
            for q, p in zip(plain.parameters(), model.parameters()):
                q.copy_(p)
        loss(plain)
        opt.step(lambda: loss(model),
                 hvp_closure=(lambda: loss(model)) if how == "hvp_closure" else None)
    assert int(model[1].num_batches_tracked) == 3
    assert torch.equal(model[1].running_mean, plain[1].running_mean)
    assert torch.equal(model[1].running_var, plain[1].running_var)


def test_restored_buffers_without_model_restores_every_module_run_inside():
    a, b = bn_net(), bn_net()
    x, _ = data()
    hooks = dict(torch.nn.modules.module._global_forward_pre_hooks)
    before = [t.clone() for t in [*a.buffers(), *b.buffers()]]
    with restored_buffers(None):
        a(x)
        a(x + 1)  # called again: its buffers were saved before the first call
        b(x)
    assert all(torch.equal(t, s) for t, s in zip([*a.buffers(), *b.buffers()], before))
    with pytest.raises(ZeroDivisionError), restored_buffers(None):
        a(x)
        1 / 0
    assert all(torch.equal(t, s) for t, s in zip(a.buffers(), before))
    assert dict(torch.nn.modules.module._global_forward_pre_hooks) == hooks, "hook left behind"


def test_restored_buffers_leaves_other_threads_modules_alone():
    mine, theirs = bn_net(), bn_net()
    x, _ = data()
    with restored_buffers(None):
        mine(x)
        worker = threading.Thread(target=theirs, args=(x,))
        worker.start()
        worker.join(WAIT)
    assert int(mine[1].num_batches_tracked) == 0
    assert int(theirs[1].num_batches_tracked) == 1, "another thread's training step undone"


def test_restored_buffers_with_model_restores_its_buffers():
    model = bn_net()
    x, _ = data()
    before = [t.clone() for t in model.buffers()]
    with restored_buffers(model):
        model(x)
    assert all(torch.equal(t, s) for t, s in zip(model.buffers(), before))


def test_fd_hypergradient_moves_batchnorm_statistics_once_like_the_gradient_mode(one_thread):
    """A train-mode validation closure (no preserved_buffers): "fd" evaluates it twice,
    but counts it once, as "grad" does."""
    x, y = data()
    xv, yv = data()
    counts = {}
    for mode in ("grad", "fd"):
        torch.manual_seed(0)
        model = bn_net()
        opt = marthe_ext.Marthe(model.parameters(), lr=0.1, mu=0.9, hyper_lr=1e-3, hypergrad=mode)
        for _ in range(3):
            opt.step(lambda: nn.functional.cross_entropy(model(x), y),
                     lambda: nn.functional.cross_entropy(model(xv), yv))
        counts[mode] = int(model[1].num_batches_tracked)
    assert counts == {"grad": 6, "fd": 6}


# --------------------------------------------------------------------- random generators
def counting_closure(model, x, y):
    """A loss whose n-th evaluation draws n random numbers: a replay draws more than the
    evaluation it repeats, so only an explicit restore of the generators ends right."""
    calls = []

    def closure():
        calls.append(None)
        torch.rand(len(calls))
        return nn.functional.cross_entropy(model(x), y)
    return closure


@pytest.mark.parametrize("where", ["fd_engine", "time_engines", "fd_hypergrad"])
def test_generators_end_where_one_evaluation_leaves_them(where):
    model = dropout_net()
    x, y = data()
    params = list(model.parameters())
    tangents = [torch.randn_like(p) for p in params]
    torch.manual_seed(7)
    with torch.no_grad():
        counting_closure(model, x, y)()  # one evaluation
    expected = torch.rand(5)
    closure = counting_closure(model, x, y)
    torch.manual_seed(7)
    if where == "fd_engine":
        ENGINES["fd"](closure, params, tangents, True, model)
    elif where == "time_engines":
        time_engines(closure, params, tangents, model)
    else:
        fd_hypergrad(closure, params, tangents)
    assert torch.equal(torch.rand(5), expected)


def test_fd_hypergradient_of_a_dropout_model_uses_one_mask(one_thread):
    """The central difference E(w + r Z) - E(w - r Z) is taken with one dropout mask (that of
    the "grad" mode's single evaluation): with two masks it measures the masks' difference."""
    x, y = data()
    xv, yv = data()
    traces = {}
    for mode in ("grad", "fd"):
        torch.manual_seed(0)
        model = dropout_net()
        opt = marthe_ext.Marthe(model.parameters(), lr=0.05, mu=0.9, hyper_lr=1e-3, hypergrad=mode)
        trace = []
        for _ in range(3):
            opt.step(lambda: nn.functional.cross_entropy(model(x), y),
                     lambda: nn.functional.cross_entropy(model(xv), yv))
            trace.append(opt.last_hypergrad)
        traces[mode] = torch.tensor(trace, dtype=F64)
    assert traces["grad"].abs().min() > 0
    assert rel_err(traces["fd"], traces["grad"]) < 1e-6


# --------------------------------------------------------------------- TF32 switch
def _tf32():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32(flags):
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_exact_float32_in_two_overlapping_threads_restores_tf32_after_both():
    """A enters, B enters, A leaves, B leaves: TF32 stays off until B leaves, then is back."""
    saved = _tf32()
    _set_tf32((True, True))
    a_in, a_out, b_in = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with exact_float32():
            a_in.set()
            b_in.wait(WAIT)
        a_out.set()

    def b():
        a_in.wait(WAIT)
        with exact_float32():
            b_in.set()
            a_out.wait(WAIT)
            seen["inside after A left"] = _tf32()

    try:
        threads = [threading.Thread(target=f) for f in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert seen == {"inside after A left": (False, False)}
        assert _tf32() == (True, True)
    finally:
        _set_tf32(saved)


def test_fd_engine_puts_tf32_back():
    saved = _tf32()
    model = bn_net()
    x, y = data()
    params = list(model.parameters())
    try:
        for flags in ((True, True), (False, True)):
            _set_tf32(flags)
            ENGINES["fd"](lambda: nn.functional.cross_entropy(model(x), y), params,
                          [torch.randn_like(p) for p in params], True, model)
            assert _tf32() == flags
    finally:
        _set_tf32(saved)


# --------------------------------------------------------------------- Triton backend
def _triton_bufs(dynamics, requires_grad=False):
    t = lambda: torch.rand(5)  # noqa: E731  (non-negative: a valid Adam second moment)
    k = len(STATE_NAMES[dynamics])
    return GroupBuffers(
        params=[t().requires_grad_(requires_grad)], grads=[t()], hvps=[t()], tangents=[t()],
        state=tuple([t()] for _ in range(k)), state_tangents=tuple([t()] for _ in range(k)))


def _coeffs(opts):
    f64 = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    return make_coeffs(eta=f64(0.1), mu=f64(0.9), lr_scale=1.0, step=f64(1.0), opts=opts,
                       ok=torch.tensor(True))


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("dynamics", ["sgd", "sgdm", "adam"])
def test_triton_update_bumps_the_version_of_what_it_writes_only(dynamics):
    """As an in-place torch op (and the torch and C++ backends) would."""
    tb = select_backend("triton", CPU)
    opts = GroupOptions(dynamics)
    bufs = _triton_bufs(dynamics)
    written = [*bufs.params, *bufs.tangents, *(t for s in bufs.state for t in s),
               *(t for s in bufs.state_tangents for t in s)]
    before = [t._version for t in written]
    read = [bufs.grads[0]._version, bufs.hvps[0]._version]
    tb.fused_update_(opts, bufs, _coeffs(opts))
    assert [t._version > v for t, v in zip(written, before)] == [True] * len(written)
    assert [bufs.grads[0]._version, bufs.hvps[0]._version] == read


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
def test_backward_through_a_weight_the_triton_update_changed_raises():
    tb = select_backend("triton", CPU)
    opts = GroupOptions("sgd")
    bufs = _triton_bufs("sgd", requires_grad=True)
    w = bufs.params[0]
    loss = (w * w).sum()  # saves w for its backward
    with torch.no_grad():
        tb.fused_update_(opts, bufs, _coeffs(opts))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --------------------------------------------------------------------- per-optimizer state
@pytest.mark.triton
def test_every_selection_gets_its_own_backend_and_table_cache():
    a, b = select_backend("triton", CPU), select_backend("triton", CPU)
    assert a is not b and a._tables is not b._tables
    assert select_backend("torch", CPU) is not select_backend("torch", CPU)


class _PausingFloat(float):
    """A cache-key value whose hashing, in one armed thread, pauses at its n-th call."""

    def __init__(self, value):
        self.armed, self.calls = None, 0
        self.paused, self.resume = threading.Event(), threading.Event()

    def __hash__(self):
        if threading.get_ident() == self.armed:
            self.calls += 1
            if self.calls == 2:  # after the lookup found the key, before it is moved
                self.paused.set()
                self.resume.wait(2)
        return float.__hash__(self)


def test_a_table_cache_shared_by_two_threads_stays_consistent():
    """Thread A finds a key; thread B evicts it before A marks it recently used. Without a
    lock A then fails; with one, B waits for A."""
    from marthe_ext.triton_kernels.tables import TableCache

    cache = TableCache(capacity=1)
    key = _PausingFloat(1.0)
    cache.constants((key,), CPU)
    errors, results = [], {}

    def run(name, values):
        try:
            results[name] = cache.constants(values, CPU)
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)

    def a():
        key.armed = threading.get_ident()
        run("a", (key,))

    thread_a = threading.Thread(target=a)
    thread_a.start()
    assert key.paused.wait(WAIT)
    thread_b = threading.Thread(target=run, args=("b", (2.0,)))
    thread_b.start()
    thread_b.join(0.5)  # with a lock, B is still waiting for A here
    key.resume.set()
    thread_a.join(WAIT)
    thread_b.join(WAIT)
    assert errors == []
    assert results["a"].tolist() == [1.0] and results["b"].tolist() == [2.0]


# --------------------------------------------------------------------- backend selection
def test_a_bug_in_a_backend_loader_propagates_under_auto(monkeypatch):
    def buggy(allow_jit):
        raise TypeError("a bug in the loader")

    monkeypatch.delenv("MARTHE_BACKEND", raising=False)
    monkeypatch.setitem(backends._LOADERS, "cpu", buggy)
    with pytest.raises(TypeError, match="a bug in the loader"):
        select_backend("auto", CPU)
    with pytest.raises(TypeError, match="a bug in the loader"):
        select_backend("cpu", CPU)


@pytest.mark.parametrize("error", [ImportError, OSError, _ext.ExtensionUnavailable])
def test_an_unavailable_backend_falls_back_under_auto_and_says_why(monkeypatch, error):
    def missing(allow_jit):
        raise error(f"test: no such build ({error.__name__})")

    monkeypatch.delenv("MARTHE_BACKEND", raising=False)
    monkeypatch.setitem(backends._LOADERS, "cpu", missing)
    with pytest.warns(RuntimeWarning, match=rf"no fast backend.*{error.__name__}"):
        assert select_backend("auto", CPU).name == "torch"
    with pytest.raises(backends.BackendUnavailable, match="no such build"):
        select_backend("cpu", CPU)


# --------------------------------------------------------------------- JIT build
def _no_installed_build(kind):
    raise ImportError(f"test: no installed {kind} build")


def test_a_jit_build_attempt_never_edits_path(monkeypatch, tmp_path):
    """The ninja wheel's folder reaches the build without touching this process's PATH (a
    process-wide variable other threads read). The build here fails fast on purpose."""
    src = tmp_path / "csrc"
    for name in ("marthe_math.h",) + _ext.cfg.CPU_SOURCES:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("#error this test's build fails on purpose\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("MAX_JOBS", "1")
    monkeypatch.setattr(_ext, "source_root", lambda: src)
    monkeypatch.setattr(_ext, "_ninja_dir", lambda: str(tmp_path / "ninja-bin"))
    monkeypatch.setattr(_ext, "_import_prebuilt", _no_installed_build)
    monkeypatch.setattr(_ext, "_modules", {})
    monkeypatch.setattr(_ext, "_jit_modules", {})
    monkeypatch.setattr(_ext, "_jit_failed", {})
    monkeypatch.setattr(_ext, "_reasons", {})
    path = os.environ["PATH"]
    writes = []
    set_item, del_item = os._Environ.__setitem__, os._Environ.__delitem__

    def recording_set(self, key, value):
        writes.append(key)
        set_item(self, key, value)

    def recording_del(self, key):
        writes.append(key)
        del_item(self, key)

    monkeypatch.setattr(os._Environ, "__setitem__", recording_set)
    monkeypatch.setattr(os._Environ, "__delitem__", recording_del)
    with pytest.raises(_ext.ExtensionUnavailable, match="(?s)JIT build failed.*fails on purpose"):
        _ext.load_extension("cpu", allow_jit=True)
    assert "PATH" not in writes
    assert os.environ["PATH"] == path
