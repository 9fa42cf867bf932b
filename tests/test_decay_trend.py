"""Safeguard (f), ``decay_trend``: decreases of the LR get their own meta step, which also
grows on a significant decay trend.

The problem is ``driven``'s (test_hyper_rules): one weight, sgd, mu = 0, so the
hypergradient is exactly the scripted h. The replay recomputes (b) "rms-log", (d), (f) and
(a') on the host from the configured start values only.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

import marthe_ext
from marthe_ext.safeguards import PRESETS
from test_hyper_rules import driven

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

# The rules (f) works with, without (e) (driven's training loss would feed it).
RULES = dict(safeguards=None, hypergrad_norm="rms-log", max_lr_growth=1.1, hyper_lr_rprop=(0.5, 1.2),
             hyper_lr_bounds=(1e-6, 0.1))


def noisy(mean, n=300, seed=0):
    """h = mean + standard normal noise: a real trend that one h shows only now and then."""
    rng = random.Random(seed)
    return [mean + rng.gauss(0.0, 1.0) for _ in range(n)]


def run(hs, **opts):
    """``driven`` with (f)'s meta step of decreases: (eta, beta, beta_down) after each step."""
    return [(eta, beta, down) for eta, beta, _, _, down in driven(hs, record=("beta_down",), **opts)]


def replay(hs, eta, beta, z, shrink=0.5, grow=1.2, low=1e-6, high=0.1, sign=False):
    """(d) and (f), then (b) "rms-log" and (a') 1.1, on the host: (eta, beta, beta_down) after
    each step; ``sign``: (f)'s trend of sign(x_hat) (``decay_trend_test="sign"``)."""
    v = count = trend = m = 0.0
    beta_down = beta
    out = []
    for h in hs:
        agree = h * trend
        factor = grow if agree > 0 else shrink if agree < 0 else 1.0
        # (f): the 20-step mean of x_hat before this step, against white noise's deviation
        factor_down = grow if m > z * math.sqrt(0.05 / 1.95) else factor
        trend = 0.9 * trend + 0.1 * h
        beta = min(max(beta * factor, low), high)
        beta_down = min(max(beta_down * factor_down, low), high)
        x = eta * h
        v, count = 0.99 * v + 0.01 * x * x, count + 1
        x_hat = x / math.sqrt(v / (1 - 0.99 ** count))
        eta = min(eta * math.exp(-(beta_down if x_hat > 0 else beta) * x_hat), 1.1 * eta)
        m = 0.95 * m + 0.05 * ((x_hat > 0) - (x_hat < 0) if sign else x_hat)
        out.append((eta, beta, beta_down))
    return out


@pytest.mark.parametrize("mean", [0.6, 0.0, -0.6])
def test_decay_trend_follows_its_rule_every_step(mean):
    hs = noisy(mean, n=120)
    got = run(hs, lr=0.1, hyper_lr=1e-3, decay_trend=2.0, **RULES)
    want = replay(hs, 0.1, 1e-3, 2.0)
    moved = 0
    for t, (g, r) in enumerate(zip(got, want)):
        assert g == pytest.approx(r, rel=1e-12), t
        assert g[2] >= g[1]  # beta_down takes (d)'s factors, and grow where (d) may not
        moved += g[2] > g[1]
    assert (moved > 20) == (mean > 0), moved


def test_a_noisy_decay_trend_revives_the_decrease_step_and_the_lr_decays():
    """h > 0 (a request for a smaller LR) in 70 % of the steps, below (d)'s 79 %: without (f)
    beta sinks to its floor and the LR freezes near its start; with (f) the meta step of
    decreases comes back to its ceiling and the LR decays by a factor of several (in bursts:
    (b)'s RMS remembers the larger eta h of before a fall, so after one the normalised trend
    is weaker for a while), while (d)'s beta, the step of increases, sinks as before."""
    hs = noisy(0.6)
    assert 0.65 < sum(h > 0 for h in hs) / len(hs) < 0.79
    without = run(hs, lr=0.1, hyper_lr=1e-3, **RULES)
    with_f = run(hs, lr=0.1, hyper_lr=1e-3, decay_trend=2.0, **RULES)
    assert max(beta for _, beta, _ in without[-150:]) < 1e-4
    assert without[-1][0] > 0.09  # frozen near the start
    assert max(down for _, _, down in with_f[-150:]) == 0.1
    assert max(beta for _, beta, _ in with_f[-150:]) < 1e-4
    assert with_f[-1][0] < 0.3 * without[-1][0]


def test_pure_noise_still_sinks_beta():
    """No trend: (f) passes only now and then, and the decrease step still sinks to its floor."""
    for seed in range(3):
        steps = run(noisy(0.0, seed=seed), lr=0.1, hyper_lr=1e-3, decay_trend=2.0, **RULES)
        assert sorted(down for _, _, down in steps[-100:])[50] < 1e-5, seed


def test_a_growth_trend_is_not_trusted():
    """A trend asking for a larger LR never passes (f): the LR and beta are (d)'s, bit for bit."""
    hs = noisy(-0.6)
    without = driven(hs, lr=0.01, hyper_lr=1e-3, **RULES)
    assert driven(hs, lr=0.01, hyper_lr=1e-3, decay_trend=2.0, **RULES) == without


def test_decay_trend_state_survives_a_checkpoint_and_old_ones_load():
    w = nn.Parameter(torch.zeros(1, dtype=F64))
    opt = marthe_ext.Marthe([w], dynamics="sgd", mu=0.0, backend="torch", decay_trend=2.0, **RULES)
    for h in (1.0, 2.0, 0.5):
        opt.step(lambda: w.sum(), lambda: -h * w.sum())
    sd = opt.state_dict()
    assert float(sd["marthe"]["x_trend"]) > 0
    sd["marthe"]["beta_down"].fill_(0.05)
    fresh = marthe_ext.Marthe([nn.Parameter(torch.zeros(1, dtype=F64))], dynamics="sgd", mu=0.0,
                              backend="torch", decay_trend=2.0, **RULES)
    fresh.load_state_dict(sd)
    restored = fresh.state_dict()["marthe"]
    assert float(restored["x_trend"]) == float(sd["marthe"]["x_trend"]) and float(restored["beta_down"]) == 0.05
    old = dict(sd, marthe={k: v for k, v in sd["marthe"].items() if k not in ("x_trend", "beta_down")})
    fresh.load_state_dict(old)  # written before (f) existed: its trend starts at 0, its step at beta
    restored = fresh.state_dict()["marthe"]
    assert float(restored["x_trend"]) == 0.0 and float(restored["beta_down"]) == float(sd["marthe"]["beta"])


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "2"])
def test_decay_trend_is_validated(bad):
    with pytest.raises((ValueError, TypeError), match="decay_trend"):
        marthe_ext.Marthe([nn.Parameter(torch.zeros(1))], decay_trend=bad)


def test_decay_trend_needs_rprop():
    with pytest.raises(ValueError, match="decay_trend changes how hyper_lr_rprop"):
        marthe_ext.Marthe([nn.Parameter(torch.zeros(1))], safeguards=None, hypergrad_norm="rms-log",
                          decay_trend=2.0)
    assert "hyper_lr_rprop" in PRESETS["robust"]  # so the default takes it as it is


def test_without_decay_trend_the_decrease_step_is_beta():
    """Without (f) beta_down mirrors beta, so a checkpoint of such a run resumed with (f) on
    starts the decrease step from beta (as one written before (f) existed does)."""
    steps = run(noisy(0.6, n=60), lr=0.1, hyper_lr=1e-3, **RULES)
    assert len({beta for _, beta, _ in steps}) > 5
    assert all(down == beta for _, beta, down in steps)


def skewed(n=300, seed=0):
    """h > 0 (a smaller LR) in 75 % of the steps but small, h < 0 rare and 3x larger: the mean
    is 0 (what the late steps of the BatchNorm CNN look like, issue 15's study)."""
    rng = random.Random(seed)
    return [0.5 if rng.random() < 0.75 else -1.5 for _ in range(n)]


def test_the_sign_test_follows_its_rule_and_trusts_a_skewed_trend():
    """decay_trend_test="sign": (f) tests the trend of sign(h), a median's test; on a skewed
    h with mean 0 it grows the decrease step and the LR decays, where the mean's test leaves
    the decrease step at its floor and the LR frozen."""
    hs = skewed()
    got = run(hs, lr=0.1, hyper_lr=1e-3, decay_trend=2.0, decay_trend_test="sign", **RULES)
    want = replay(hs, 0.1, 1e-3, 2.0, sign=True)
    for t, (g, r) in enumerate(zip(got, want)):
        assert g == pytest.approx(r, rel=1e-12), t
    of_mean = run(hs, lr=0.1, hyper_lr=1e-3, decay_trend=2.0, **RULES)
    assert of_mean == pytest.approx(replay(hs, 0.1, 1e-3, 2.0), rel=1e-12)
    assert sum(down > beta for _, beta, down in got) > 200
    assert max(down for _, _, down in got[-150:]) == 0.1 and got[-1][0] < 0.02  # the LR decays 5x+
    assert max(down for _, _, down in of_mean[-150:]) < 1e-3 and of_mean[-1][0] > 0.099  # frozen


def test_decay_trend_test_is_validated_and_needs_decay_trend():
    w = [nn.Parameter(torch.zeros(1))]
    assert marthe_ext.Marthe(w).decay_trend_test == PRESETS["robust"].get("decay_trend_test", "mean")
    assert marthe_ext.Marthe(w, decay_trend_test="sign").decay_trend_test == "sign"
    assert marthe_ext.Marthe(w, safeguards=None).decay_trend_test == "mean"
    with pytest.raises(ValueError, match="decay_trend_test must be one of"):
        marthe_ext.Marthe(w, decay_trend_test="median")
    with pytest.raises(ValueError, match="set decay_trend too"):
        marthe_ext.Marthe(w, safeguards=None, decay_trend_test="sign")
