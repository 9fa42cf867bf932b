"""The rules that move eta, beta and mu, replayed on the host from what a run records.

Each test drives the public optimizer, records the quantities a rule reads (the
hypergradient ``opt.last_hypergrad``, the gradients), recomputes the rule step by step in
float64 Python and compares every step. A replay starts from the configured values only,
never from the optimizer's own eta or beta, so a wrong rule cannot agree with itself.
The property tests (hypothesis) feed arbitrary hypergradient sequences, 0, inf and NaN
included, through a problem whose h is exactly the number chosen.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import marthe_ext
from marthe_ext.safeguards import PRESETS

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    x, y = torch.randn(32, 5, dtype=F64), torch.randint(0, 3, (32,))
    xv, yv = torch.randn(32, 5, dtype=F64), torch.randint(0, 3, (32,))
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    return model, batches, (lambda: nn.functional.cross_entropy(model(xv), yv))


# --------------------------------------------------------------------------- mu = "auto"
def auto_mu_replay(mu, c, eta, dot):
    """The authors' rule, with the 1/0 cases of Marthe's docstring: q = eta / <gE, gc>,
    z = clip(q, 0, 1) (0 when <gE, gc> <= 0 or is not finite), c <- c sign(mu) + mu,
    mu <- z ** (1 / (c + 1)) (c + 1 <= 0: mu = 1 if z == 1 else 0)."""
    z = min(max(eta / dot, 0.0), 1.0) if dot > 0 and math.isfinite(dot) else 0.0
    c = c * (0.0 if mu == 0 else math.copysign(1.0, mu)) + mu
    mu = z ** (1.0 / (c + 1)) if c + 1 > 0 else float(z == 1.0)
    return mu, c



@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_mu_auto_follows_the_authors_rule_every_step(weight_decay):
    """mu after step t from grad E(w_{t+1}) (val mode: the hypergradient uses it), this step's
    gc = clip(g + wd w_t) (g = p.grad after the step) and eta_{t+1} (the LR update runs first)."""
    model, batches, val = mlp_problem()
    params = list(model.parameters())
    clip = 0.1
    opt = marthe_ext.Marthe(params, lr=0.005, mu="auto", hyper_lr=1e-3, grad_clip=clip,
                            weight_decay=weight_decay, safeguards=None)
    mu, c, mus, clipped = -1.0, 0.0, [], 0
    for t in range(30):
        xb, yb = batches[t % len(batches)]
        w_t = [p.detach().clone() for p in params]
        opt.step(lambda: nn.functional.cross_entropy(model(xb), yb), val)
        gc = [(p.grad + weight_decay * w).clamp(-clip, clip) for p, w in zip(params, w_t)]
        with torch.enable_grad():
            g_e = torch.autograd.grad(val(), params)
        dot = sum(float((ge.clamp(-clip, clip) * g).sum()) for ge, g in zip(g_e, gc))
        clipped += sum(int((g.abs() == clip).sum()) for g in gc)
        mu, c = auto_mu_replay(mu, c, opt.lr, dot)
        hs = opt.hyper_state()
        assert float(hs["mu_counter"]) == pytest.approx(c, rel=1e-15, abs=0), t
        assert float(hs["mu"]) == pytest.approx(mu, rel=1e-15, abs=0), t
        assert opt.mu == pytest.approx(min(max(mu, 0.0), 1.0), rel=1e-15, abs=0)
        mus.append(mu)
    assert opt.skipped_steps == 0
    assert clipped > 0, "the clip must act, or clipping gc is not tested"
    assert len({round(m, 6) for m in mus}) > 10 and any(0 < m < 1 for m in mus), "mu must move inside (0, 1)"


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(mu=st.one_of(st.just(-1.0), st.floats(0.0, 1.0)),
       c=st.one_of(st.just(-1.0), st.floats(0.0, 1e6)),
       eta=st.one_of(st.floats(0.0, 1e3), st.sampled_from([0.0, 1e-320, math.inf])),
       dot=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-320])))
@example(mu=-1.0, c=0.0, eta=0.9, dot=0.5)  # c + 1 = 0 and z = 1: mu = 1
@example(mu=-1.0, c=0.0, eta=0.1, dot=0.5)  # c + 1 = 0 and z < 1: mu = 0
@example(mu=0.0, c=-1.0, eta=0.1, dot=0.5)  # sign(0) = 0: c restarts at 0
def test_auto_mu_rule_is_defined_everywhere(mu, c, eta, dot):
    """The rule function on any inputs, its 1/0 cases included: the replay's value, in [0, 1]."""
    from marthe_ext.controller import auto_mu

    f64 = dict(dtype=F64)
    got_mu, got_c = auto_mu(torch.tensor(mu, **f64), torch.tensor(c, **f64), torch.tensor(eta, **f64),
                            torch.tensor(dot, **f64))
    want_mu, want_c = auto_mu_replay(mu, c, eta, dot)
    assert 0.0 <= float(got_mu) <= 1.0
    assert float(got_mu) == pytest.approx(want_mu, rel=1e-15, abs=0)
    assert float(got_c) == want_c


# --------------------------------------------------------------------------- hyper_lr_adapt
@pytest.mark.parametrize("alpha", [0.5, 50.0], ids=["moves", "clamps-at-0"])
def test_hyper_lr_adapt_follows_the_rule_every_step(alpha):
    """Paper's update then alpha's: eta <- max(eta - beta h, 0); beta <- max(beta + alpha h eta, 0)
    with the new eta, replayed from lr and hyper_lr alone over 30 steps."""
    model, batches, val = mlp_problem()
    eta, beta = 0.05, 1e-3
    opt = marthe_ext.Marthe(model.parameters(), lr=eta, mu=0.9, hyper_lr=beta, hyper_lr_adapt=alpha,
                            safeguards=None)
    betas = []
    for t in range(30):
        xb, yb = batches[t % len(batches)]
        opt.step(lambda: nn.functional.cross_entropy(model(xb), yb), val)
        h = opt.last_hypergrad
        eta = max(eta - beta * h, 0.0)
        beta = max(beta + alpha * h * eta, 0.0)
        assert opt.lr == pytest.approx(eta, rel=1e-15, abs=0), t
        assert opt.hyper_lr == pytest.approx(beta, rel=1e-15, abs=0), t
        betas.append(beta)
    assert opt.skipped_steps == 0
    assert len(set(betas)) > 10, "beta must move"
    if alpha > 1:
        assert 0.0 in betas, "the clamp at 0 must act"


# --------------------------------------------------------------------------- properties
def driven(hs, record=(), **opts):
    """Run one step per h in ``hs`` on a problem whose hypergradient is exactly h.

    One weight, sgd, mu = 0, training loss w (gradient 1): after the step Zw = -1, so with the
    validation loss -h w the hypergradient <grad E, Zw> is h, bit for bit. A non-finite h
    makes the step skip. Returns (eta, beta, skipped, recorded h) after each step, followed by
    the ``opt.hyper_state()`` entries named in ``record``."""
    w = nn.Parameter(torch.zeros(1, dtype=F64))
    opt = marthe_ext.Marthe([w], dynamics="sgd", mu=0.0, backend="torch", **opts)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped-step warning
        for h in hs:
            opt.step(lambda: w.sum(), lambda: -h * w.sum())
            out.append((opt.lr, opt.hyper_lr, opt.skipped_steps, opt.last_hypergrad,
                        *(float(opt.hyper_state()[k]) for k in record)))
    return out


HS = st.lists(
    st.one_of(st.floats(allow_nan=True, allow_infinity=True),
              st.floats(-1e3, 1e3),
              st.sampled_from([0.0, -0.0, 1e-320, -1e300, 1e300])),
    min_size=1, max_size=20)
PROPERTY = settings(max_examples=40, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(hs=HS)
@example(hs=[1.0, -1.0, 1.0, math.inf, -1.0, math.nan, 1e300, 0.0])
def test_robust_default_keeps_eta_positive_and_bounded(hs):
    """The default preset on any h sequence: eta finite and > 0, growth <= 1.1 per step,
    |log(eta'/eta)| <= beta / sqrt(1 - 0.99) (with (f)'s own step for decreases), both steps in
    their bounds, beta moved only by (d)'s grow / shrink factors;
    a non-finite h skips the step and leaves no trace: the run equals the one without it."""
    eta, beta, skipped = 1e-2, 0.1, 0  # the first |x_hat| is 1 and 0.1 > log 1.1: the growth cap acts
    got = driven(hs, record=("beta_down",), lr=eta, hyper_lr=beta)
    finite = [i for i, h in enumerate(hs) if math.isfinite(h)]
    without = driven([hs[i] for i in finite], record=("beta_down",), lr=eta, hyper_lr=beta)
    assert [got[i][:2] + got[i][4:] for i in finite] == [r[:2] + r[4:] for r in without]
    for h, (eta2, beta2, skipped2, h_seen, down2) in zip(hs, got):
        if not math.isfinite(h):
            assert (eta2, beta2, skipped2) == (eta, beta, skipped + 1)
        else:
            assert h_seen == h and skipped2 == skipped
            assert 0 < eta2 < math.inf
            assert eta2 <= 1.1 * eta * (1 + 1e-15)
            step = beta2 if eta2 >= eta else down2
            assert abs(math.log(eta2 / eta)) <= step / math.sqrt(1 - 0.99) * (1 + 1e-9)
            assert 1e-6 <= beta2 <= down2 <= 0.1
            shrink, grow = PRESETS["robust"]["hyper_lr_rprop"]
            assert beta2 / beta in (pytest.approx(grow, rel=1e-15), 1.0, pytest.approx(shrink, rel=1e-15)) \
                or beta2 in (1e-6, 0.1)
        eta, beta, skipped = eta2, beta2, skipped2


def same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


@PROPERTY
@given(hs=HS)
def test_faithful_update_is_the_paper_s_for_any_h(hs):
    """safeguards=None: eta = max(eta - beta h, 0) and, with hyper_lr_adapt, beta =
    max(beta + alpha h eta, 0) >= 0, exactly as the replay; a non-finite h skips the step
    (val mode: after the weight update, which ran with the old eta). A result that overflows
    (a huge h) is not applied: eta or beta keeps its value."""
    eta, beta, alpha, skipped, w = 1e-2, 1e-3, 0.5, 0, 0.0
    for h, (eta2, beta2, skipped2, _) in zip(hs, driven(hs, lr=eta, hyper_lr=beta, hyper_lr_adapt=alpha,
                                                        safeguards=None)):
        loss_ok = math.isfinite(w)  # the training loss is w: a finite one lets the weight update run
        if loss_ok:
            w -= eta
        if loss_ok and math.isfinite(h):
            eta_new = max(eta - beta * h, 0.0)
            beta_new = max(beta + alpha * h * eta_new, 0.0)
            beta = beta_new if math.isfinite(beta_new) else beta
            eta = eta_new if math.isfinite(eta_new) else eta
        else:
            skipped += 1
        assert same(eta2, eta) and same(beta2, beta) and skipped2 == skipped, (h, eta2, eta, beta2, beta)
        assert math.isfinite(eta) and math.isfinite(beta) and eta >= 0 and beta >= 0


def test_faithful_update_never_writes_a_nan_lr_from_finite_hypergradients():
    hs = [-359538626963.0, 1e300, 0.0]  # found by the property test above
    for eta, beta, skipped, _ in driven(hs, lr=1e-2, hyper_lr=1e-3, hyper_lr_adapt=0.5, safeguards=None):
        assert not math.isnan(eta) and not math.isnan(beta)


def test_one_huge_hypergradient_does_not_freeze_the_robust_lr():
    """(b)'s running mean of (eta h)^2 would overflow to inf on one huge h, and every later
    normalised step would be 0 (the LR frozen for good): such an h is left out of it."""
    hs = [1e200] + [1.0, -0.5] * 5
    etas = [eta for eta, _, _, _ in driven(hs, lr=1e-2, hyper_lr=1e-2)]
    assert all(math.isfinite(e) and e > 0 for e in etas)
    assert len({*etas[1:]}) > 5, f"the LR must keep moving after the huge h: {etas}"
