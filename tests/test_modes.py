"""The cheaper modes: ``first_order``, ``hvp_every`` and ``hypergrad_every``.

* Oracle (float64): the optimizer's tangent after T steps equals forward-mode AD through
  the unrolled loop of the same approximate model: on the steps without an HVP the
  training gradient is a constant of w (the vector the nominal trajectory computed, fed
  back as a fixed sequence), on the others it is differentiated. Every dynamics, mu = 1
  and mu < 1, every backend that runs float64 here (the fused kernels take hz = 0 as their
  HVP-free flag: ``hvps=None``).
* The HVP engine is called on exactly the stated steps; the validation closure too.
* k = 1 is bit-identical to the default; a checkpoint resume keeps the phase.
* Bad options raise naming the problem.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import grad, jvp

import marthe_ext
from marthe_ext import hvp as hvp_module
from marthe_ext.backends.api import STATE_NAMES
from phi_reference import STATE_LEN, flat_mlp, phi
from required_backends import backend_or_skip

F64 = torch.float64
CASES = [("sgd", False), ("sgdm", False), ("sgdm", True), ("adam", False), ("adamw", False)]
CASE_IDS = ["sgd", "sgdm", "nesterov", "adam", "adamw"]
BACKENDS = ["torch", "cpu", "triton"]
T = 6


def rel_err(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def _cat(parts):
    return torch.cat([p.reshape(-1) for p in parts])


class _FlatModel(torch.nn.Module):
    def __init__(self, parts):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in parts])

    def flat(self):
        return torch.cat([p.reshape(-1) for p in self.ps])


def _problem(sizes=(5, 7, 3)):
    batches = [(torch.randn(8, sizes[0], dtype=F64), torch.randint(0, sizes[-1], (8,))) for _ in range(T)]
    loss_fn, shapes, unflatten = flat_mlp(list(sizes), *batches[0])
    w0 = torch.cat([torch.randn(math.prod(s), dtype=F64) * 0.5 for s in shapes])
    return batches, loss_fn, unflatten, w0


def _hvp_steps(mode: dict) -> set:
    """The steps whose A_t keeps the Hessian term (step 0 has Z = 0: no HVP either way)."""
    if mode.get("first_order"):
        return set()
    k = mode.get("hvp_every", 1)
    return {t for t in range(1, T) if t % k == 0}


MODES = [dict(first_order=True), dict(hvp_every=2), dict(hvp_every=4), dict()]
MODE_IDS = ["first_order", "hvp_every=2", "hvp_every=4", "exact"]


# Triton runs in its interpreter here (seconds per case): the HVP-free flag on it, at one mu.
ORACLE_CASES = [pytest.param(mode, mu, backend, id=f"{mode_id}-mu={mu}-{backend}")
                for mode, mode_id in zip(MODES, MODE_IDS) for mu in (1.0, 0.7) for backend in BACKENDS
                if backend != "triton" or (mode.get("first_order") and mu == 0.7)]


@pytest.mark.parametrize("mode,mu,backend_name", ORACLE_CASES)
@pytest.mark.parametrize("dyn,nesterov", CASES, ids=CASE_IDS)
def test_tangent_equals_unrolled_derivative_of_the_approximate_model(dyn, nesterov, mu, mode, backend_name):
    backend_or_skip(backend_name)
    eta = 0.05 if dyn in ("sgd", "sgdm") else 0.01
    # The clip bites on some elements: the fixed gradients are the clipped ones. Only without
    # any HVP: the library also clips hz itself (SPEC step 3, the authors' convention), which
    # is not the derivative of the clipped gradient where |hz| > c.
    clip = 0.3 if mode.get("first_order") else None
    batches, loss_fn, unflatten, w0 = _problem()
    model = _FlatModel(unflatten(w0))
    # Two groups: the first with its own lr_scale and (coupled or decoupled) weight decay.
    groups = [dict(params=list(model.ps[:2]), lr_scale=0.5, weight_decay=0.02),
              dict(params=list(model.ps[2:]), lr_scale=1.0, weight_decay=0.0)]
    n_first = sum(p.numel() for p in model.ps[:2])
    s_vec = torch.cat([torch.full((n_first,), 0.5, dtype=F64), torch.ones(w0.numel() - n_first, dtype=F64)])
    wd_vec = torch.cat([torch.full((n_first,), 0.02, dtype=F64), torch.zeros(w0.numel() - n_first, dtype=F64)])

    opt = marthe_ext.Marthe(groups, lr=eta, dynamics=dyn, nesterov=nesterov, mu=mu, hyper_lr=0.0,
                            safeguards=None, grad_clip=clip, backend=backend_name, **mode)
    for t in range(T):
        xb, yb = batches[t]
        opt.step(lambda: loss_fn(model.flat(), xb, yb))
    assert opt.backend == backend_name

    def regularised_clipped_grad(w, t):
        xb, yb = batches[t]
        g = grad(lambda v: loss_fn(v, xb, yb))(w)
        if dyn != "adamw":
            g = g + wd_vec * w
        return g if clip is None else torch.clamp(g, -clip, clip)

    # The nominal trajectory (beta = 0: it does not depend on the tangent) and its gradients.
    fixed, w, state = [], w0, tuple(torch.zeros_like(w0) for _ in range(STATE_LEN[dyn]))
    for t in range(T):
        fixed.append(regularised_clipped_grad(w, t))
        w, state = phi(dyn, w, state, eta, lambda _: fixed[t], s=s_vec,
                       wd=wd_vec if dyn == "adamw" else 0.0, nesterov=nesterov, k=t + 1)
    hvp_steps = _hvp_steps(mode)

    def unrolled(delta):
        w = w0
        state = tuple(torch.zeros_like(w0) for _ in range(STATE_LEN[dyn]))
        for t in range(T):
            eta_t = eta + mu ** (T - 1 - t) * delta
            # Exact steps differentiate the gradient; the others hold it at its nominal value.
            grad_t = (lambda v, t=t: regularised_clipped_grad(v, t)) if t in hvp_steps else (lambda _, t=t: fixed[t])
            w, state = phi(dyn, w, state, eta_t, grad_t, s=s_vec, wd=wd_vec if dyn == "adamw" else 0.0,
                           nesterov=nesterov, k=t + 1)
        return (w, *state)

    zero, one = torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    final, d_final = jvp(unrolled, (zero,), (one,))
    st = [opt.state[p] for p in model.ps]
    assert rel_err(model.flat().detach(), final[0]) < 1e-12
    assert rel_err(_cat([s["tangent"] for s in st]), d_final[0]) < 1e-8
    for name, want in zip(STATE_NAMES[dyn], d_final[1:]):
        got = _cat([s["tangent_" + name] for s in st])
        if want.norm() == 0:  # first-order: the state does not depend on eta at all
            assert got.norm() == 0
        else:
            assert rel_err(got, want) < 1e-8

    if mode:  # the approximation is a different model: the exact derivative must not pass
        def exact(delta):
            w = w0
            state = tuple(torch.zeros_like(w0) for _ in range(STATE_LEN[dyn]))
            for t in range(T):
                w, state = phi(dyn, w, state, eta + mu ** (T - 1 - t) * delta,
                               lambda v, t=t: regularised_clipped_grad(v, t), s=s_vec,
                               wd=wd_vec if dyn == "adamw" else 0.0, nesterov=nesterov, k=t + 1)
            return w
        assert rel_err(_cat([s["tangent"] for s in st]), jvp(exact, (zero,), (one,))[1]) > 1e-4


# ----------------------------------------------------------------------------- which steps
def _mlp_task(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    xv, yv = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    return model, (x, y), (xv, yv)


class _Counter:
    """Wraps the reverse engine: records (step index, need_hvp) of every call."""

    def __init__(self, monkeypatch, opt_ref):
        self.calls = []
        inner = hvp_module.ENGINES["reverse"]
        self.opt_ref = opt_ref

        def counted(closure, params, tangents, need_hvp, model=None):
            self.calls.append((self.opt_ref[0]._protocol.steps_called, need_hvp))
            return inner(closure, params, tangents, need_hvp, model)

        monkeypatch.setitem(hvp_module.ENGINES, "reverse", counted)

    def hvp_steps(self):
        return [t for t, need in self.calls if need]


def _run(opt, model, batch, val, steps, *, hvp_closure=False, val_calls=None, start=0):
    x, y = batch
    xv, yv = val
    lrs = []
    for t in range(start, start + steps):
        def val_closure():
            if val_calls is not None:
                val_calls.append(t)
            return torch.nn.functional.cross_entropy(model(xv), yv)
        extra = {"hvp_closure": lambda: torch.nn.functional.cross_entropy(model(x[:4]), y[:4])} if hvp_closure else {}
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y), val_closure=val_closure, **extra)
        lrs.append(opt.lr)
    return lrs


STEP_CASES = [("exact", dict(), list(range(1, 12))),
              ("first_order", dict(first_order=True), []),
              ("hvp_every=3", dict(hvp_every=3), [3, 6, 9]),
              ("hvp_every=4-auto-mu", dict(hvp_every=4, mu="auto"), [4, 8]),
              ("hd", dict(mu=0.0), [])]


# first_order rejects an hvp_closure (tested below): no sub-batch case for it.
@pytest.mark.parametrize("options,expected,sub_batch", [
    pytest.param(options, expected, sub, id=f"{name}-{'hvp_closure' if sub else 'full'}")
    for name, options, expected in STEP_CASES for sub in (False, True)
    if not (sub and options.get("first_order"))])
def test_hvp_taken_on_exactly_the_stated_steps(monkeypatch, options, expected, sub_batch):
    model, batch, val = _mlp_task()
    ref = [None]
    counter = _Counter(monkeypatch, ref)
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, backend="torch", **{"mu": 0.9, **options})
    ref[0] = opt
    _run(opt, model, batch, val, 12, hvp_closure=sub_batch)
    if sub_batch:
        # The training closure never asks for an HVP; the sub-batch one exactly on the stated steps.
        assert [t for t, need in counter.calls if need] == expected
        assert len(counter.calls) == 12 + len(expected)
    else:
        assert counter.hvp_steps() == expected
        assert len(counter.calls) == 12  # one gradient per step, no extra pass


def test_backward_style_asks_for_the_hvp_on_the_stated_steps(monkeypatch):
    from marthe_ext import protocol

    seen = []
    inner = protocol.backward_gradients

    def recorded(params, tangents, need_hvp, hvp):
        seen.append(need_hvp)
        return inner(params, tangents, need_hvp, hvp)

    monkeypatch.setattr(protocol, "backward_gradients", recorded)
    model, (x, y), _ = _mlp_task()
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, mu=0.9, hvp_every=2, backend="torch")
    for _ in range(7):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
        opt.step()
    assert [t for t, need in enumerate(seen) if need] == [2, 4, 6]


@pytest.mark.parametrize("mode", ["train", "val"])
def test_hypergrad_every_updates_the_lr_only_on_the_stated_steps(mode):
    model, batch, val = _mlp_task()
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, mu=0.9, hypergrad_every=3, backend="torch",
                            safeguards=None, hyper_lr=1e-2)
    x, y = batch
    calls, lrs, hs = [], [], []
    for t in range(10):
        def val_closure(t=t):
            calls.append(t)
            return torch.nn.functional.cross_entropy(model(val[0]), val[1])
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y),
                 val_closure=val_closure if mode == "val" else None)
        lrs.append(opt.lr)
        hs.append(opt.last_hypergrad)
    due = [0, 3, 6, 9]
    if mode == "val":
        assert calls == due  # the validation pass is skipped on the other steps
    changed = [t for t in range(10) if lrs[t] != (lrs[t - 1] if t else 0.05)]
    # The train-mode h at t = 0 is <g, 0> = 0: the LR moves from step 3 on.
    assert changed == (due if mode == "val" else due[1:])
    assert all(hs[t] == hs[t - 1] for t in range(1, 10) if t not in due)


@pytest.mark.parametrize("options", [dict(hvp_every=1), dict(hypergrad_every=1),
                                     dict(hvp_every=1, hypergrad_every=1, first_order=False)])
@pytest.mark.parametrize("dyn", ["sgdm", "adam"])
def test_k_equal_one_is_bit_identical_to_exact(options, dyn):
    runs = []
    for opts in ({}, options):
        torch.manual_seed(0)
        model, batch, val = _mlp_task()
        opt = marthe_ext.Marthe(model.parameters(), lr=0.01, dynamics=dyn, mu=0.95, backend="torch", **opts)
        lrs = _run(opt, model, batch, val, 8)
        runs.append((lrs, [p.detach().clone() for p in model.parameters()],
                     [opt.state[p]["tangent"].clone() for p in model.parameters()]))
    (lr_a, w_a, z_a), (lr_b, w_b, z_b) = runs
    assert lr_a == lr_b
    assert all(torch.equal(a, b) for a, b in zip(w_a + z_a, w_b + z_b))


@pytest.mark.parametrize("options", [dict(hvp_every=3), dict(hypergrad_every=3),
                                     dict(hvp_every=4, hypergrad_every=3)])
def test_checkpoint_resume_keeps_the_phase(monkeypatch, options):
    def fresh():
        torch.manual_seed(0)
        model, batch, val = _mlp_task()
        return model, batch, val, marthe_ext.Marthe(model.parameters(), lr=0.05, mu=0.9, backend="torch",
                                                   **options)

    ref = [None]
    counter = _Counter(monkeypatch, ref)
    model, batch, val, opt = fresh()
    ref[0] = opt
    val_calls = []
    lrs = _run(opt, model, batch, val, 11, val_calls=val_calls)
    straight = (counter.hvp_steps(), val_calls, lrs, [p.detach().clone() for p in model.parameters()])

    counter.calls.clear()
    model, batch, val, opt = fresh()
    ref[0] = opt
    val_calls = []
    lrs = _run(opt, model, batch, val, 5, val_calls=val_calls)  # stop mid-period (5 % 3 != 0)
    sd = opt.state_dict()
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    model, batch, val, opt = fresh()  # a new process: new model, new optimizer
    model.load_state_dict(model_sd)
    opt.load_state_dict(sd)
    ref[0] = opt
    lrs += _run(opt, model, batch, val, 6, val_calls=val_calls, start=5)
    resumed = (counter.hvp_steps(), val_calls, lrs, [p.detach().clone() for p in model.parameters()])

    assert resumed[:3] == straight[:3]
    assert all(torch.equal(a, b) for a, b in zip(resumed[3], straight[3]))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("options,error,match", [
    (dict(first_order=1), TypeError, "first_order must be a bool"),
    (dict(hvp_every=0), ValueError, "hvp_every must be >= 1"),
    (dict(hvp_every=2.0), TypeError, "hvp_every must be an int"),
    (dict(hvp_every=True), TypeError, "hvp_every must be an int"),
    (dict(hypergrad_every=-1), ValueError, "hypergrad_every must be >= 1"),
    (dict(hypergrad_every="2"), TypeError, "hypergrad_every must be an int"),
    (dict(hvp_every=2, first_order=True), ValueError, "contradict"),
    (dict(hvp_every=2, mu=0.0), ValueError, "no effect with mu=0"),
])
def test_bad_mode_options_raise(options, error, match):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(error, match=match):
        marthe_ext.Marthe(model.parameters(), **{"mu": 0.9, **options})


def test_first_order_rejects_an_hvp_closure():
    model, (x, y), _ = _mlp_task()
    opt = marthe_ext.Marthe(model.parameters(), first_order=True, backend="torch")
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    with pytest.raises(ValueError, match="hvp_closure is unused with first_order"):
        opt.step(loss, hvp_closure=loss)


def test_options_are_readable():
    opt = marthe_ext.Marthe(torch.nn.Linear(3, 2).parameters(), hvp_every=4, hypergrad_every=2)
    assert (opt.first_order, opt.hvp_every, opt.hypergrad_every) == (False, 4, 2)
    assert marthe_ext.RTHO(torch.nn.Linear(3, 2).parameters(), first_order=True).config.first_order


# ----------------------------------------------------------------------------- the study
def test_modes_study_smoke(tmp_path, one_thread):
    """``run.py modes --quick``, cut down: runs, resumes from its log, writes the table."""
    from marthe_experiments import modes_study

    argv = ["--quick", "--setups", "e1", "--modes", "first-order,fixed-lr", "--betas", "0.1",
            "--out", str(tmp_path), "--no-progress"]
    assert modes_study.main(argv) == 0
    lines = (tmp_path / "modes_runs.jsonl").read_text().splitlines()
    assert len(lines) == 3  # exact (added for the paired differences), first-order, fixed-lr
    results = json.loads((tmp_path / "modes_results.json").read_text())
    rows = {r["mode"]: r for r in results["summary"]}
    assert set(rows) == {"exact", "first-order", "fixed-lr"}
    assert rows["fixed-lr"]["time_vs_plain"] == 1.0
    assert all(r["ms_per_step"] > 0 for r in rows.values())
    assert "| e1 | first-order |" in (tmp_path / "modes_table.md").read_text()
    assert modes_study.main(argv) == 0  # everything is in the log: nothing reruns
    assert (tmp_path / "modes_runs.jsonl").read_text().splitlines() == lines
