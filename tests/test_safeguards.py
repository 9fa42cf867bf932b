"""Each safeguard's bound holds step by step on a problem built to make the faithful
algorithm run away; with the safeguards off the trajectory is the faithful one, bit for bit."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import marthe_ext

F64 = torch.float64
FAITHFUL = dict(safeguards=None, max_lr_change=None, max_lr_growth=None, hypergrad_norm=None,
                max_tangent_ratio=None, hyper_lr_rprop=None)


def run(steps=25, state_dict=None, warm_steps=0, **kwargs):
    """A noisy quadratic where a small LR makes h < 0 every step: a large beta sends the
    faithful algorithm's LR far past the stability limit 2 / lambda_max.

    ``warm_steps``: steps taken before loading ``state_dict``, so that the checkpoint is
    loaded into an optimizer whose own hyper-state is no longer the start state."""
    torch.manual_seed(0)
    n = 20
    q = torch.randn(n, n, dtype=F64)
    hess = q @ q.T / n + 0.1 * torch.eye(n, dtype=F64)
    w = torch.nn.Parameter(torch.randn(n, dtype=F64))
    opts = dict(lr=1e-3, dynamics="sgdm", mu=0.99, hyper_lr=1.0, safeguards=None)
    opts.update(kwargs)
    opt = marthe_ext.Marthe([w], **opts)
    for _ in range(warm_steps):
        opt.step(lambda: 0.5 * w @ hess @ w)
    start = 0
    if state_dict is not None:  # resume: weights and optimizer from a checkpoint of this run
        w.data.copy_(state_dict["w"])
        opt.load_state_dict(state_dict["opt"])
        start = state_dict["t"]
    trace = []
    for t in range(start, start + steps):
        noise = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(t)) * 0.01
        opt.step(lambda: 0.5 * w @ hess @ w + noise @ w)
        st = opt.state[w]
        trace.append(dict(eta=opt.lr, w=w.detach().clone(), zw=st["tangent"].clone(),
                          zv=st["tangent_momentum_buffer"].clone(), skipped=opt.skipped_steps,
                          beta=opt.hyper_lr, h=opt.last_hypergrad,
                          checkpoint=dict(w=w.detach().clone(), opt=copy.deepcopy(opt.state_dict()), t=t + 1)))
    return trace, 2.0 / float(torch.linalg.eigvalsh(hess).max())


def test_faithful_algorithm_runs_away_on_this_problem():
    trace, limit = run(**FAITHFUL)
    worst = max(t["eta"] for t in trace)
    assert worst > 10 * limit or trace[-1]["skipped"] > 0 or not torch.isfinite(trace[-1]["w"]).all()


def test_lr_change_bound_holds_every_step():
    rho = 1.5
    trace, _ = run(max_lr_change=rho)
    etas = [1e-3] + [t["eta"] for t in trace]
    for a, b in zip(etas, etas[1:]):
        assert a / rho * (1 - 1e-12) <= b <= a * rho * (1 + 1e-12)
    assert trace[-1]["skipped"] == 0


@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_log_space_rms_step_is_bounded_and_positive(decay):
    beta = 0.05
    trace, _ = run(hyper_lr=beta, hypergrad_norm="rms-log", hypergrad_norm_decay=decay)
    etas = [1e-3] + [t["eta"] for t in trace]
    bound = beta / math.sqrt(1 - decay)
    for a, b in zip(etas, etas[1:]):
        assert b > 0
        assert abs(math.log(b / a)) <= bound * (1 + 1e-9)
    assert len(set(etas)) > 3, "the LR must move"


def test_rms_normalised_step_is_bounded():
    beta, decay = 1e-3, 0.99
    trace, _ = run(hyper_lr=beta, hypergrad_norm="rms", hypergrad_norm_decay=decay)
    etas = [1e-3] + [t["eta"] for t in trace]
    for a, b in zip(etas, etas[1:]):
        assert abs(b - a) <= beta / math.sqrt(1 - decay) * (1 + 1e-9)
        assert b >= 0


def test_tangent_norm_cap_holds_every_step():
    kappa = 0.5
    trace, _ = run(max_tangent_ratio=kappa, hyper_lr=1e-2)
    capped = 0
    finite = [t for t in trace if torch.isfinite(t["w"]).all() and torch.isfinite(t["zw"]).all()]
    assert len(finite) > 5
    for t in finite:
        ratio = float(t["zw"].norm() / t["w"].norm())
        assert ratio <= kappa * (1 + 1e-12)
        capped += ratio > kappa * (1 - 1e-9)
    assert capped > 0, "the cap must have been active on this problem"


def faithful_lr_replay(trace, eta0, beta):
    """SPEC section 2 on the host, from the recorded h: eta_t = max(eta_{t-1} - beta h_t, 0)
    (train mode: opt.lr after step t is the eta step t used); a skipped step keeps eta."""
    eta, skipped, out = eta0, 0, []
    for t in trace:
        if t["skipped"] == skipped:
            eta = max(eta - beta * t["h"], 0.0)
        skipped = t["skipped"]
        out.append(eta)
    return out


def same_lrs(got, want):
    return len(got) == len(want) and all(a == pytest.approx(b, rel=1e-15, abs=0) for a, b in zip(got, want))


@pytest.mark.parametrize("opts", [
    dict(lr=0.5, hyper_lr=3e-3),  # h of both signs, eta clamped at 0 several times
    dict(),                       # the runaway: eta grows by ~1e180, then skipped steps
], ids=["both-signs-and-clamp", "runaway-and-skips"])
def test_safeguards_off_is_bit_identical_to_the_faithful_algorithm(opts):
    explicit, _ = run(**FAITHFUL, **opts)
    etas = [t["eta"] for t in explicit]
    replay = faithful_lr_replay(explicit, opts.get("lr", 1e-3), opts.get("hyper_lr", 1.0))
    assert same_lrs(etas, replay), list(zip(etas, replay))
    assert len(set(etas)) > 5, "the LR must move"
    if opts:
        assert 0.0 in etas and any(t["h"] < 0 for t in explicit) and explicit[-1]["skipped"] == 0
    else:
        assert explicit[-1]["skipped"] > 0
    # safeguards=None alone switches every safeguard off: the same run, bit for bit ...
    for a, b in zip(explicit, run(**opts)[0]):
        assert a["eta"] == b["eta"] and a["h"] == b["h"]
        assert torch.equal(a["w"], b["w"]) and torch.equal(a["zw"], b["zw"])
    # ... while the default preset is another update, which this replay tells apart.
    robust, _ = run(**dict(opts, hyper_lr=1e-3, safeguards="robust"))
    assert not same_lrs([t["eta"] for t in robust], faithful_lr_replay(robust, opts.get("lr", 1e-3), 1e-3))


def test_safeguard_arguments_are_validated():
    w = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="max_lr_change"):
        marthe_ext.Marthe(w, max_lr_change=0.5)
    with pytest.raises(ValueError, match="max_lr_growth"):
        marthe_ext.Marthe(w, max_lr_growth=1.0)
    with pytest.raises(ValueError, match="hypergrad_norm"):
        marthe_ext.Marthe(w, hypergrad_norm="adam")
    with pytest.raises(ValueError, match="max_tangent_ratio"):
        marthe_ext.Marthe(w, max_tangent_ratio=0.0)


def test_growth_bound_holds_and_leaves_decreases_free():
    rho_up = 1.2
    trace, _ = run(max_lr_growth=rho_up)
    etas = [1e-3] + [t["eta"] for t in trace]
    ratios = [b / a for a, b in zip(etas, etas[1:]) if a > 0]
    assert all(r <= rho_up * (1 + 1e-12) for r in ratios)
    assert any(r < 1 / rho_up for r in ratios), "a decrease beyond 1/rho_up must pass"


RPROP = dict(hypergrad_norm="rms-log", max_lr_growth=1.1, hyper_lr_rprop=(0.5, 1.2))
ROBUST = dict(RPROP, loss_trust=0.5)


def test_meta_step_follows_the_sign_agreement_rule_every_step():
    """Replay (d) on the host from the recorded h: beta_t = clip(beta_{t-1} * {1.2 if
    h_t trend_{t-1} > 0, 0.5 if < 0, else 1}, low, high), trend = 0.9 trend + 0.1 h."""
    low, high = 1e-4, 0.3
    trace, _ = run(steps=60, lr=0.05, hyper_lr=1e-3, hyper_lr_bounds=(low, high), **RPROP)
    beta, trend, factors = 1e-3, 0.0, set()
    for t in trace:
        assert t["skipped"] == 0
        factor = 1.2 if t["h"] * trend > 0 else 0.5 if t["h"] * trend < 0 else 1.0
        beta = min(max(beta * factor, low), high)
        trend = 0.9 * trend + 0.1 * t["h"]
        assert t["beta"] == pytest.approx(beta, rel=1e-12, abs=0)
        factors.add(factor)
    assert {0.5, 1.2} <= factors, "the run must both lengthen and shorten the meta step"
    etas = [0.05] + [t["eta"] for t in trace]
    assert all(b <= 1.1 * a * (1 + 1e-12) for a, b in zip(etas, etas[1:]))


def test_meta_step_adaptation_lets_a_tiny_beta_move_the_lr():
    fixed, _ = run(steps=60, hyper_lr=1e-5, hypergrad_norm="rms-log", max_lr_growth=1.1)
    adapted, _ = run(steps=60, hyper_lr=1e-5, **RPROP)
    assert abs(math.log(fixed[-1]["eta"] / 1e-3)) < 0.01
    assert abs(math.log(adapted[-1]["eta"] / 1e-3)) > math.log(2)
    assert adapted[-1]["beta"] > 100 * 1e-5


def test_meta_step_state_resumes_bit_for_bit_from_a_checkpoint():
    whole, _ = run(steps=30, hyper_lr=1e-3, **RPROP)
    resumed, _ = run(steps=15, hyper_lr=1e-3, state_dict=whole[14]["checkpoint"], **RPROP)
    for a, b in zip(whole[15:], resumed):
        assert a["eta"] == b["eta"] and a["beta"] == b["beta"]
        assert torch.equal(a["w"], b["w"]) and torch.equal(a["zw"], b["zw"])


def robust_replay(meta, hs, trend, decay=0.99, low=1e-6, high=0.1, shrink=0.5, grow=1.2, rho_up=1.1):
    """(d) then (b) "rms-log" then (a') on the host, from a checkpoint's hyper-state and the
    recorded h, with the trend starting at ``trend``: the (eta, beta) after each step."""
    eta, beta = float(meta["eta"]), float(meta["beta"])
    sq, n = float(meta["h_sq_avg"]), float(meta["h_count"])
    out = []
    for h in hs:
        agree = h * trend
        if beta > 0:
            beta = min(max(beta * (grow if agree > 0 else shrink if agree < 0 else 1.0), low), high)
        trend = 0.9 * trend + 0.1 * h
        x = eta * h
        sq, n = decay * sq + (1 - decay) * x * x, n + 1
        v_hat = sq / (1 - decay ** n)
        x_hat = x / math.sqrt(v_hat) if v_hat > 0 else 0.0
        eta = min(eta * math.exp(-beta * x_hat), rho_up * eta)
        out.append((eta, beta))
    return out


def test_checkpoint_without_the_trend_entry_loads_with_a_zero_trend():
    """State dicts written before safeguard (d) existed lack 'h_trend': the trend restarts at
    0, also in an optimizer that has already stepped (its own trend is not kept)."""
    whole, _ = run(steps=4, hyper_lr=1e-3, **RPROP)
    sd = whole[-1]["checkpoint"]
    meta = sd["opt"]["marthe"]
    old = dict(sd, opt=dict(sd["opt"], marthe={k: v for k, v in meta.items() if k != "h_trend"}))
    assert float(meta["h_trend"]) != 0
    resumed, _ = run(steps=10, hyper_lr=1e-3, state_dict=old, warm_steps=3, **RPROP)
    kept, _ = run(steps=10, hyper_lr=1e-3, state_dict=sd, warm_steps=3, **RPROP)

    def close(trace, replay):
        return all(t["eta"] == pytest.approx(eta, rel=1e-12) and t["beta"] == pytest.approx(beta, rel=1e-15)
                   for t, (eta, beta) in zip(trace, replay))

    assert all(t["skipped"] == 0 for t in resumed + kept)
    assert close(resumed, robust_replay(meta, [t["h"] for t in resumed], trend=0.0))
    # The replay tells the two apart: with the saved trend the first factor is 1.2 or 0.5, not 1.
    assert close(kept, robust_replay(meta, [t["h"] for t in kept], trend=float(meta["h_trend"])))
    assert resumed[0]["beta"] == float(meta["beta"]) != kept[0]["beta"]


def test_meta_step_arguments_are_validated():
    w = [torch.nn.Parameter(torch.zeros(2))]
    norm = dict(hypergrad_norm="rms-log")
    with pytest.raises(ValueError, match="set hypergrad_norm"):
        marthe_ext.Marthe(w, hyper_lr_rprop=(0.5, 1.2), safeguards=None)
    with pytest.raises(ValueError, match="choose one"):
        marthe_ext.Marthe(w, hyper_lr_rprop=(0.5, 1.2), hyper_lr_adapt=0.1, safeguards=None, **norm)
    with pytest.raises(TypeError, match="pair"):
        marthe_ext.Marthe(w, hyper_lr_rprop=1.2, **norm)
    with pytest.raises(ValueError, match="shrink"):
        marthe_ext.Marthe(w, hyper_lr_rprop=(1.5, 1.2), **norm)
    with pytest.raises(ValueError, match="grow"):
        marthe_ext.Marthe(w, hyper_lr_rprop=(0.5, 0.9), **norm)
    with pytest.raises(ValueError, match="hyper_lr_bounds"):
        marthe_ext.Marthe(w, hyper_lr=1e-3, hyper_lr_rprop=(0.5, 1.2), hyper_lr_bounds=(1e-2, 1.0), **norm)
    with pytest.raises(ValueError, match="hyper_lr_bounds"):
        marthe_ext.Marthe(w, hyper_lr=1e-3, hyper_lr_rprop=(0.5, 1.2), hyper_lr_bounds=(1e-2, 1e-3), **norm)


def test_robust_preset_is_the_same_as_its_options_given_one_by_one():
    preset, _ = run(steps=30, safeguards="robust", hyper_lr=1e-3)
    explicit, _ = run(steps=30, hyper_lr=1e-3, **ROBUST)
    for a, b in zip(preset, explicit):
        assert a["eta"] == b["eta"] and a["beta"] == b["beta"] and torch.equal(a["w"], b["w"])


def test_preset_fills_only_the_options_not_given():
    w = [torch.nn.Parameter(torch.zeros(2))]
    opt = marthe_ext.Marthe(w, safeguards="robust")
    assert (opt.hypergrad_norm, opt.max_lr_growth, opt.hyper_lr_rprop, opt.loss_trust, opt.decay_trend) == \
        ("rms-log", 1.1, (0.5, 1.2), 0.5, 2.0)
    assert opt.hyper_lr == 1e-3 and opt.safeguards == "robust"
    opt = marthe_ext.Marthe(w, safeguards="robust", max_lr_growth=1.5, hypergrad_norm="rms", hyper_lr=0.1)
    assert (opt.hypergrad_norm, opt.max_lr_growth, opt.hyper_lr) == ("rms", 1.5, 0.1)
    faithful = marthe_ext.Marthe(w, safeguards=None)
    assert (faithful.hypergrad_norm, faithful.max_lr_growth, faithful.hyper_lr_rprop,
            faithful.loss_trust, faithful.decay_trend) == (None, None, None, None, None)
    assert faithful.hyper_lr == 1e-6
    with pytest.raises(ValueError, match="safeguards must be None or one of"):
        marthe_ext.Marthe(w, safeguards="safe")
    with pytest.raises(ValueError, match="pass safeguards=None"):
        marthe_ext.Marthe(w, safeguards="robust", hyper_lr_adapt=0.1)


def test_zero_beta_keeps_the_lr_fixed_under_the_robust_preset():
    trace, _ = run(steps=10, safeguards="robust", hyper_lr=0.0)
    assert all(t["eta"] == 1e-3 and t["beta"] == 0.0 for t in trace)


def test_log_space_update_refuses_a_zero_lr():
    w = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr must be > 0 with hypergrad_norm='rms-log'"):
        marthe_ext.Marthe(w, lr=0.0)
    assert marthe_ext.Marthe(w, lr=0.0, safeguards=None).lr == 0.0
