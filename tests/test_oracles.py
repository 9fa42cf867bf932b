"""SPEC section 4: the exact oracles (float64, CPU).

* the fused update's tangent equals ``mu * jvp(Phi) + dPhi/deta`` for every dynamics,
  on a quadratic with an explicit Hessian and on a tiny MLP, for every backend that runs
  float64 here;
* the optimizer's tangent after T steps equals forward-mode AD through the unrolled loop
  (mu = 1: d w_T / d eta; mu < 1: the discounted perturbation), relative error < 1e-8;
* HD (mu = 0, train mode, sgd) reproduces eta_t = eta_{t-1} + beta <g_t, g_{t-1}>.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, jvp

import marthe_ext
from marthe_ext.backends.api import STATE_NAMES, GroupBuffers, GroupOptions, make_coeffs
from phi_reference import STATE_LEN, flat_mlp, phi
from required_backends import backend_or_skip

F64 = torch.float64
CASES = [("sgd", False), ("sgdm", False), ("sgdm", True), ("adam", False), ("adamw", False)]
CASE_IDS = ["sgd", "sgdm", "nesterov", "adam", "adamw"]


# Backends that run float64 here. Every one is always parametrised: one that cannot load is
# skipped with its reason, or fails when MARTHE_REQUIRE_BACKENDS lists it.
F64_BACKENDS = ["torch", "cpu"]


def rel_err(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def _split(flat, sizes=(5, 0, 17)):
    """Cut a flat vector into separate tensors (odd sizes, one empty) plus the rest."""
    parts, start = [], 0
    for n in sizes:
        parts.append(flat[start:start + n].clone())
        start += n
    parts.append(flat[start:].clone().reshape(-1, 1))
    return parts


def _cat(parts):
    return torch.cat([p.reshape(-1) for p in parts])


def _problem(kind, n_hint=40):
    if kind == "quadratic":
        n = n_hint
        q = torch.randn(n, n, dtype=F64)
        hess = q @ q.T / n + torch.eye(n, dtype=F64)
        b = torch.randn(n, dtype=F64)
        return n, (lambda w: hess @ w + b), (lambda w, z: hess @ z)
    loss_fn, shapes, _ = flat_mlp([4, 6, 3], torch.randn(9, 4, dtype=F64), torch.randint(0, 3, (9,)))
    n = sum(math.prod(s) for s in shapes)
    grad_fn = grad(loss_fn)
    return n, grad_fn, (lambda w, z: jvp(grad_fn, (w,), (z,))[1])


@pytest.mark.parametrize("backend_name", F64_BACKENDS)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("mu", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("problem", ["quadratic", "mlp"])
@pytest.mark.parametrize("dyn,nesterov", CASES, ids=CASE_IDS)
def test_fused_tangent_equals_jvp_of_phi(dyn, nesterov, problem, mu, clip, backend_name):
    backend = backend_or_skip(backend_name)
    n, grad_fn, hvp_fn = _problem(problem)
    eta, s, wd, k = 0.1, 0.7, 0.05, 3
    w = torch.randn(n, dtype=F64)
    state = [torch.rand(n, dtype=F64) + 0.1 for _ in range(STATE_LEN[dyn])]
    z_w = torch.randn(n, dtype=F64)
    z_s = [torch.randn(n, dtype=F64) for _ in range(STATE_LEN[dyn])]
    g = grad_fn(w)
    c = None
    if clip:
        g_eff = g + (0.0 if dyn == "adamw" else wd) * w
        c = 0.9 * float(g_eff.abs().median())
        # Shrink Z so that the clipped HVP stays inside [-c, c]: then clipping is the exact
        # derivative of the clipped gradient and the oracle applies.
        hz = hvp_fn(w, z_w) + (0.0 if dyn == "adamw" else wd) * z_w
        scale = 0.5 * c / float(hz.abs().max())
        z_w = z_w * scale
    hv = hvp_fn(w, z_w)
    kw = dict(s=s, wd=wd, nesterov=nesterov, k=k, clip=c)

    def step(x_w, *x_s, e=torch.tensor(eta, dtype=F64)):
        w2, s2 = phi(dyn, x_w, x_s, e, grad_fn, **kw)
        return (w2, *s2)

    new, az = jvp(step, (w, *state), (z_w, *z_s))
    _, b = jvp(lambda e: step(w, *state, e=e), (torch.tensor(eta, dtype=F64),),
               (torch.tensor(1.0, dtype=F64),))
    expected_z = [mu * a + bb for a, bb in zip(az, b)]

    opts = GroupOptions(dyn, weight_decay=wd, grad_clip=c, nesterov=nesterov)
    bufs = GroupBuffers(
        params=_split(w), grads=_split(g), hvps=_split(hv), tangents=_split(z_w),
        state=tuple(_split(x) for x in state), state_tangents=tuple(_split(x) for x in z_s))
    f64 = dict(dtype=F64)
    coeffs = make_coeffs(eta=torch.tensor(eta, **f64), mu=torch.tensor(mu, **f64), lr_scale=s,
                         step=torch.tensor(float(k), **f64), opts=opts, ok=torch.tensor(True))
    backend.fused_update_(opts, bufs, coeffs)

    assert rel_err(_cat(bufs.params), new[0]) < 1e-12
    for got, want in zip(bufs.state, new[1:]):
        assert rel_err(_cat(got), want) < 1e-12
    assert rel_err(_cat(bufs.tangents), expected_z[0]) < 1e-10
    for got, want in zip(bufs.state_tangents, expected_z[1:]):
        assert rel_err(_cat(got), want) < 1e-10


class _FlatModel(torch.nn.Module):
    """Holds the MLP's parameters as separate tensors; the loss reads them at call time."""

    def __init__(self, parts):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in parts])

    def flat(self):
        return torch.cat([p.reshape(-1) for p in self.ps])


def _unrolled_setup(T=6, sizes=(5, 7, 3)):
    batches = [(torch.randn(8, sizes[0], dtype=F64), torch.randint(0, sizes[-1], (8,))) for _ in range(T)]
    loss_fn, shapes, unflatten = flat_mlp(list(sizes), *batches[0])
    w0 = torch.cat([torch.randn(math.prod(s), dtype=F64) * 0.5 for s in shapes])
    return batches, loss_fn, shapes, unflatten, w0


@pytest.mark.parametrize("hvp", ["reverse", "forward"])
@pytest.mark.parametrize("mu", [1.0, 0.8, 0.0])
@pytest.mark.parametrize("dyn,nesterov", CASES, ids=CASE_IDS)
def test_unrolled_hypergradient(dyn, nesterov, mu, hvp):
    T, eta = 6, 0.05 if dyn in ("sgd", "sgdm") else 0.01
    batches, loss_fn, shapes, unflatten, w0 = _unrolled_setup(T)
    model = _FlatModel(unflatten(w0))
    # Two groups: the first layer with its own lr_scale and weight decay.
    groups = [dict(params=list(model.ps[:2]), lr_scale=0.5, weight_decay=0.02),
              dict(params=list(model.ps[2:]), lr_scale=1.0, weight_decay=0.0)]
    n_first = sum(p.numel() for p in model.ps[:2])
    s_vec = torch.cat([torch.full((n_first,), 0.5, dtype=F64), torch.ones(w0.numel() - n_first, dtype=F64)])
    wd_vec = torch.cat([torch.full((n_first,), 0.02, dtype=F64), torch.zeros(w0.numel() - n_first, dtype=F64)])

    opt = marthe_ext.Marthe(groups, lr=eta, dynamics=dyn, nesterov=nesterov, mu=mu, hyper_lr=0.0, safeguards=None,
                            hvp=hvp, model=model, backend="torch")
    for t in range(T):
        xb, yb = batches[t]
        opt.step(lambda: loss_fn(model.flat(), xb, yb))
    assert opt.lr == eta

    def unrolled(delta):
        w = w0
        state = tuple(torch.zeros_like(w0) for _ in range(STATE_LEN[dyn]))
        for t in range(T):
            xb, yb = batches[t]
            eta_t = eta + mu ** (T - 1 - t) * delta
            w, state = phi(dyn, w, state, eta_t, grad(lambda v: loss_fn(v, xb, yb)),
                           s=s_vec, wd=wd_vec, nesterov=nesterov, k=t + 1)
        return (w, *state)

    zero, one = torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    final, d_final = jvp(unrolled, (zero,), (one,))
    st = [opt.state[p] for p in model.ps]
    assert rel_err(model.flat().detach(), final[0]) < 1e-12
    assert rel_err(_cat([s["tangent"] for s in st]), d_final[0]) < 1e-8
    for name, want in zip(STATE_NAMES[dyn], d_final[1:]):
        assert rel_err(_cat([s["tangent_" + name] for s in st]), want) < 1e-8


def test_hd_special_case_reproduces_hypergradient_descent():
    T, eta0, beta = 8, 0.05, 0.02
    batches, loss_fn, shapes, unflatten, w0 = _unrolled_setup(T)
    model = _FlatModel(unflatten(w0))
    opt = marthe_ext.HD(model.parameters(), lr=eta0, dynamics="sgd", hyper_lr=beta, backend="torch",
                        safeguards=None)
    got = []
    for t in range(T):
        xb, yb = batches[t]
        opt.step(lambda: loss_fn(model.flat(), xb, yb))
        got.append(opt.lr)

    w, eta, g_prev, want = w0.clone(), eta0, None, []
    for t in range(T):
        xb, yb = batches[t]
        g = grad(lambda v: loss_fn(v, xb, yb))(w)
        if g_prev is not None:
            eta = eta + beta * float(g @ g_prev)
        want.append(eta)
        w = w - eta * g
        g_prev = g
    assert len(set(got)) > 2, "the LR must actually move in this test"
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-12 * abs(b)
    assert rel_err(model.flat().detach(), w) < 1e-12
