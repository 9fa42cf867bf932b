"""Mixed precision: bf16 autocast with every engine, fp16 autocast with dynamic loss scaling
(marthe_ext/amp.py), each against float32.

Tolerances (relative L2 error of all weights after 8 Adam steps against the float32 run,
measured 2026-11-30 on this CPU): bf16 5.3e-3 -> asserted < 2e-2; fp16 with scaling
0.9e-3 (exact engines) and 1.4e-3 (fd) -> asserted < 5e-3.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import marthe_ext
from marthe_ext import DynamicLossScale

ENGINES = ("reverse", "forward", "fd")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batch(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(64, 10, generator=g), torch.randint(0, 4, (64,), generator=g)


def _optimizer(model, engine, loss_scale=None):
    return marthe_ext.Marthe(model.parameters(), lr=0.1, dynamics="adam", mu=0.9, hvp=engine,
                             model=model, loss_scale=loss_scale)


def _closure(model, t, dtype, factor=1.0):
    x, y = _batch(t)

    def closure():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return F.cross_entropy(model(x), y) * factor
    return closure


def _train(dtype, engine, loss_scale=None, steps=8, factor=1.0):
    model = _model()
    opt = _optimizer(model, engine, loss_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skipped-step notices
        losses = [opt.step(_closure(model, t, dtype, factor)) for t in range(steps)]
    return torch.cat([p.detach().flatten() for p in model.parameters()]), torch.stack(losses), opt


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("engine", ENGINES)
def test_scaling_in_float32_is_bit_identical_to_no_scaling(engine):
    # S is a power of two: S * loss, its derivatives and the division by S are exact.
    ref, ref_losses, ref_opt = _train(torch.float32, engine)
    w, losses, opt = _train(torch.float32, engine, DynamicLossScale(init_scale=2.0 ** 10, growth_interval=3))
    assert torch.equal(w, ref) and torch.equal(losses, ref_losses)
    assert opt.lr == ref_opt.lr and opt.skipped_steps == 0
    assert opt.loss_scale == 2.0 ** 12  # grew twice in 8 finite steps (interval 3)


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_autocast_works_with_every_engine(engine):
    ref, _, _ = _train(torch.float32, engine)
    w, losses, opt = _train(torch.bfloat16, engine)
    assert opt.skipped_steps == 0 and torch.isfinite(losses).all()
    assert _rel(w, ref) < 2e-2


@pytest.mark.parametrize("engine", ENGINES)
def test_fp16_autocast_with_loss_scaling_matches_float32(engine):
    ref, _, _ = _train(torch.float32, engine)
    w, _, opt = _train(torch.float16, engine, DynamicLossScale(init_scale=2.0 ** 10, growth_interval=3))
    assert opt.skipped_steps == 0
    assert _rel(w, ref) < 5e-3


def test_fp16_gradients_that_underflow_are_recovered_by_scaling():
    # A loss of size 1e-7: its float16 activation gradients flush to zero unscaled.
    ref, _, _ = _train(torch.float32, "reverse", factor=1e-7)
    unscaled, _, _ = _train(torch.float16, "reverse", factor=1e-7)
    scaled, _, opt = _train(torch.float16, "reverse", "dynamic", factor=1e-7)
    assert _rel(unscaled, ref) > 0.1  # measured 0.26: the case needs scaling
    assert _rel(scaled, ref) < 5e-3  # measured 4.4e-4
    assert opt.skipped_steps == 0


def test_overflow_skips_the_step_counts_it_and_backs_off():
    model = _model()
    opt = _optimizer(model, "reverse", DynamicLossScale(init_scale=2.0 ** 24))
    skipped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(14):
            before = [p.detach().clone() for p in model.parameters()]
            scale = opt.loss_scale
            opt.step(_closure(model, t, torch.float16))
            unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            if opt.skipped_steps > skipped:  # a skipped step changes nothing but S
                skipped += 1
                assert unchanged and opt.loss_scale == scale / 2
            else:
                assert not unchanged and opt.loss_scale == scale
    assert 0 < skipped < 14  # 2**24 overflows float16; a few halvings later steps go through


def test_scale_state_round_trips_through_state_dict():
    rule = DynamicLossScale(init_scale=2.0 ** 8, growth_interval=3)
    model = _model()
    opt = _optimizer(model, "reverse", rule)
    for t in range(4):
        opt.step(_closure(model, t, torch.float32))
    sd = opt.state_dict()
    assert float(sd["marthe"]["loss_scale"]["scale"]) == 2.0 ** 9
    assert int(sd["marthe"]["loss_scale"]["growth_tracker"]) == 1
    twin = _model()
    twin.load_state_dict(model.state_dict())
    opt2 = _optimizer(twin, "reverse", rule)
    opt2.load_state_dict(sd)
    for t in range(4, 7):  # the third step after the reload grows S only if the count was kept
        opt.step(_closure(model, t, torch.float32))
        opt2.step(_closure(twin, t, torch.float32))
    assert opt2.loss_scale == opt.loss_scale == 2.0 ** 10
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_backward_style_with_scale_loss_equals_the_closure_step():
    rule = DynamicLossScale(init_scale=2.0 ** 10)
    ref_model, model = _model(), _model()
    ref_opt, opt = _optimizer(ref_model, "reverse", rule), _optimizer(model, "reverse", rule)
    for t in range(4):
        ref_opt.step(_closure(ref_model, t, torch.float32))
        opt.zero_grad()
        loss = _closure(model, t, torch.float32)()
        opt.scale_loss(loss).backward(create_graph=True)
        opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("option, error, match", [
    ("static", ValueError, "loss_scale must be None, 'dynamic'"),
    (1024.0, TypeError, "loss_scale must be None, 'dynamic'"),
])
def test_bad_loss_scale_options(option, error, match):
    with pytest.raises(error, match=match):
        marthe_ext.Marthe(_model().parameters(), loss_scale=option)


@pytest.mark.parametrize("kwargs, match", [
    (dict(growth_factor=3.0), "growth_factor must be a power of two"),
    (dict(backoff_factor=1.0), "backoff_factor must be a power of two in"),
    (dict(growth_interval=0), "growth_interval must be an int"),
    (dict(init_scale=0.0), "init_scale must be in"),
])
def test_bad_dynamic_loss_scale(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicLossScale(**kwargs)
