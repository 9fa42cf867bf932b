"""Safeguard (e), ``loss_trust``: the LR trust region driven by the training loss.

The problem is ``driven``'s (test_hyper_rules): one weight, sgd, mu = 0, so the
hypergradient is exactly the scripted h; the training loss is w + c_t, so the loss the
step sees is scripted too (c_t dominates) while the gradient stays 1.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import marthe_ext
from marthe_ext.safeguards import PRESETS

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

# h < 0 throughout: the hypergradient keeps asking for a larger LR (the digits collapse).
HS = [-1.0] * 40
# The loss falls, rises far past the band for 12 steps (the LR overshoots), then falls.
OFFSETS = [10.0 / (1 + t) + (30.0 if 15 <= t < 27 else 0.0) for t in range(40)]
# The default safeguards without (e): the preset fills only what is not given, so it is
# dropped by spelling the rest out.
NO_TRUST = dict(safeguards=None, **{k: v for k, v in PRESETS["robust"].items() if k != "loss_trust"})


def scripted(hs, offsets, backward_style=False, **opts):
    w = nn.Parameter(torch.zeros(1, dtype=F64))
    opt = marthe_ext.Marthe([w], dynamics="sgd", mu=0.0, backend="torch", **opts)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for h, c in zip(hs, offsets):
            if backward_style:
                opt.zero_grad()
                loss = w.sum() + c
                loss.backward()
                returned = opt.step(val_closure=lambda: -h * w.sum(),
                                    loss=loss if backward_style == "with loss" else None)
                assert (returned is None) == (backward_style != "with loss")
            else:
                opt.step(lambda: w.sum() + c, lambda: -h * w.sum())
            out.append((opt.lr, opt.hyper_lr, float(w.detach())))
    return out


def replay(hs, offsets, eta, beta, tau):
    """The paper's update then (e), on the host: the LR after each step."""
    w, avg, count, best, ref, out = 0.0, 0.0, 0, math.inf, eta, []
    for h, c in zip(hs, offsets):
        loss = w + c                      # seen before the update
        w -= eta                          # gradient 1
        eta_new = max(eta - beta * h, 0.0)
        avg, count = 0.9 * avg + 0.1 * loss, count + 1
        smoothed = avg / (1 - 0.9 ** count)
        if smoothed < best:
            best, ref = smoothed, eta
        if smoothed > best + tau * abs(best):
            eta_new = min(eta_new, ref)
        eta = eta_new
        out.append(eta)
    return out


def test_loss_trust_follows_its_rule_every_step():
    got = scripted(HS, OFFSETS, safeguards=None, hyper_lr=0.01, lr=0.05, loss_trust=0.5)
    want = replay(HS, OFFSETS, eta=0.05, beta=0.01, tau=0.5)
    assert [g[0] for g in got] == pytest.approx(want, rel=1e-12)
    # the rule acted: without it the LR grows by beta every step
    free = scripted(HS, OFFSETS, safeguards=None, hyper_lr=0.01, lr=0.05)
    assert max(g[0] for g in got) < free[-1][0] - 0.1


def test_rising_loss_caps_the_robust_lr_and_shrinks_beta():
    """With the default safeguards: while the smoothed loss is above the band the LR stays at
    or below the LR it had at the best loss, and (d)'s beta shrinks; a falling loss alone is
    never a trigger (bit-identical to the rule off)."""
    on = scripted(HS, OFFSETS, hyper_lr=0.05, lr=0.01)  # the default: loss_trust=0.5
    off = scripted(HS, OFFSETS, hyper_lr=0.05, lr=0.01, **NO_TRUST)
    assert on[:15] == off[:15]                      # falling loss: nothing changes
    assert off[-1][0] > 3 * on[-1][0]               # without (e) the LR keeps climbing
    peak_before_rise = on[14][0]
    assert all(eta <= peak_before_rise * 1.1 ** 2 for eta, _, _ in on[15:27])
    # (d) alone grows beta here (h agrees with its trend every step); (e) outweighs it
    assert min(b for _, b, _ in on[15:27]) < 0.5 * on[14][1]
    assert min(b for _, b, _ in off[15:27]) >= off[14][1]


def test_falling_loss_is_bit_identical_to_the_rule_off():
    falling = [10.0 / (1 + t) for t in range(40)]
    assert scripted(HS, falling, loss_trust=0.1) == scripted(HS, falling, **NO_TRUST)


def test_backward_style_sees_no_loss_and_leaves_the_rule_inactive():
    on = scripted(HS, OFFSETS, backward_style=True, hyper_lr=0.05, lr=0.01)
    off = scripted(HS, OFFSETS, backward_style=True, hyper_lr=0.05, lr=0.01, **NO_TRUST)
    assert on == off


def test_backward_style_with_loss_is_the_closure_style():
    """``opt.step(loss=loss)`` after ``loss.backward()``: the rule sees the loss as it sees a
    closure's, so the trajectory is the closure style's, bit for bit."""
    closure = scripted(HS, OFFSETS, hyper_lr=0.05, lr=0.01, loss_trust=0.5)
    assert scripted(HS, OFFSETS, backward_style="with loss", hyper_lr=0.05, lr=0.01, loss_trust=0.5) == closure


def test_loss_argument_is_checked():
    w = nn.Parameter(torch.zeros(1, dtype=F64))
    opt = marthe_ext.Marthe([w], dynamics="sgd", mu=0.0, backend="torch")
    with pytest.raises(ValueError, match="not both"):
        opt.step(lambda: w.sum(), loss=w.sum())
    w.grad = torch.ones_like(w)
    with pytest.raises(TypeError, match="scalar loss tensor"):
        opt.step(loss=1.5)
    with pytest.raises(TypeError, match="scalar loss tensor"):
        opt.step(loss=torch.ones(3))


def test_loss_trust_state_survives_a_checkpoint_and_old_ones_load():
    w = nn.Parameter(torch.zeros(1, dtype=F64))
    opt = marthe_ext.Marthe([w], dynamics="sgd", mu=0.0, backend="torch", loss_trust=0.5)
    for c in (5.0, 4.0, 3.0):
        opt.step(lambda: w.sum() + c, lambda: w.sum())
    sd = opt.state_dict()
    meta = sd["marthe"]
    assert float(meta["loss_best"]) < 5.0 and float(meta["loss_count"]) == 3
    fresh = marthe_ext.Marthe([nn.Parameter(torch.zeros(1, dtype=F64))], dynamics="sgd", mu=0.0,
                              backend="torch", loss_trust=0.5)
    fresh.load_state_dict(sd)
    assert float(fresh.state_dict()["marthe"]["loss_best"]) == float(meta["loss_best"])
    # written before (e) existed: its statistics start afresh (best = +inf, LR at best = eta)
    old = dict(sd, marthe={k: v for k, v in meta.items()
                           if k not in ("loss_avg", "loss_count", "loss_best", "lr_at_best")})
    fresh.load_state_dict(old)
    restored = fresh.state_dict()["marthe"]
    assert math.isinf(float(restored["loss_best"])) and float(restored["loss_count"]) == 0
    assert float(restored["lr_at_best"]) == float(meta["eta"])


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "0.5"])
def test_loss_trust_is_validated(bad):
    with pytest.raises((ValueError, TypeError), match="loss_trust"):
        marthe_ext.Marthe([nn.Parameter(torch.zeros(1))], loss_trust=bad)
