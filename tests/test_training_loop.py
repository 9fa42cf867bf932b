"""The training-loop surface (marthe_ext/training_loop.py): the backward-style step and
``param_groups[i]["lr"]`` with torch's LR schedulers.

* backward style equals closure style bit for bit (every dynamics, mu 0 / 0.99 / 1, train
  and val modes), plain backward where no HVP is needed, clear errors otherwise;
* the graph kept by backward(create_graph=True) is released by every step;
* zero_grad and gradient accumulation behave as defined in training_loop.py;
* group["lr"] = eta * lr_scale * f, the scheduler rule checked against forward-mode AD
  through the unrolled loop (float64), LambdaLR through follow_eta, no host sync in step(),
  checkpoints with and without the new group keys.
"""
from __future__ import annotations

import copy
import gc
import io
import math
import weakref

import pytest
import torch
from torch import nn
from torch.func import grad, jvp
from torch.optim import lr_scheduler
from torch.utils._python_dispatch import TorchDispatchMode

import marthe_ext
from marthe_ext.training_loop import follow_eta
from phi_reference import STATE_LEN, flat_mlp, phi

F64 = torch.float64
# torch warns about the parameter/.grad reference cycle of backward(create_graph=True); the
# step breaks it (test_each_step_releases_the_graph_and_the_reference_cycle).
pytestmark = pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
CASES = [("sgd", False), ("sgdm", False), ("sgdm", True), ("adam", False), ("adamw", False)]
CASE_IDS = ["sgd", "sgdm", "nesterov", "adam", "adamw"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Bit-for-bit comparisons of two runs: one thread, the same reduction order."""


def mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def batches(n, dtype=torch.float32):
    return [(torch.randn(12, 5, dtype=dtype), torch.randint(0, 3, (12,))) for _ in range(n)]


def make_opt(net, **kw):
    groups = [dict(params=list(net[0].parameters()), lr_scale=0.5, weight_decay=0.01),
              dict(params=list(net[2].parameters()))]
    kw.setdefault("lr", 0.05)
    return marthe_ext.Marthe(groups, **kw)


def assert_same_run(model_a, opt_a, model_b, opt_b):
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
        assert torch.equal(pa.grad, pb.grad)
        assert set(opt_a.state[pa]) == set(opt_b.state[pb])
        for k in opt_a.state[pa]:
            assert torch.equal(opt_a.state[pa][k], opt_b.state[pb][k]), k
    for k, v in opt_a.hyper_state().items():
        assert torch.equal(v, opt_b.hyper_state()[k]), k
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert torch.equal(ga["lr"], gb["lr"])


# --------------------------------------------------------------------------- backward style
def _closure_run(model, opt, data, val):
    for x, y in data:
        opt.step(lambda: loss_fn(model, x, y), val)


def _backward_run(model, opt, data, val, mu):
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        # No graph where no HVP is needed: HD (mu = 0) and the first step.
        loss = loss_fn(model, x, y)
        loss.backward(create_graph=mu != 0 and t > 0)
        # loss=: the step sees the loss as a closure's (the default's safeguard (e) uses it)
        assert torch.equal(opt.step(val_closure=val, loss=loss), loss.detach())


@pytest.mark.parametrize("mode", ["train", "val"])
@pytest.mark.parametrize("mu", [0.0, 0.99, 1.0])
@pytest.mark.parametrize("dyn,nesterov", CASES, ids=CASE_IDS)
def test_backward_style_equals_closure_style_bit_for_bit(dyn, nesterov, mu, mode):
    data = batches(4)
    xv, yv = batches(1)[0]
    model_c = mlp()
    model_b = copy.deepcopy(model_c)
    kw = dict(dynamics=dyn, nesterov=nesterov, mu=mu, grad_clip=1.0, lr=0.05 if dyn.startswith("sgd") else 0.01)
    opt_c, opt_b = make_opt(model_c, **kw), make_opt(model_b, **kw)
    val_c = (lambda: loss_fn(model_c, xv, yv)) if mode == "val" else None
    val_b = (lambda: loss_fn(model_b, xv, yv)) if mode == "val" else None
    _closure_run(model_c, opt_c, data, val_c)
    _backward_run(model_b, opt_b, data, val_b, mu)
    assert opt_b.lr != kw["lr"], "the LR must move in this test"
    if mu != 0:
        assert any(opt_b.state[p]["tangent"].abs().sum() > 0 for p in model_b.parameters())
    assert_same_run(model_c, opt_c, model_b, opt_b)


def test_backward_style_with_hvp_auto_takes_the_hvp_from_the_graph():
    data = batches(3)
    model_c = mlp()
    model_b = copy.deepcopy(model_c)
    opt_c, opt_b = make_opt(model_c, mu=0.99), make_opt(model_b, mu=0.99, hvp="auto")
    _closure_run(model_c, opt_c, data, None)
    _backward_run(model_b, opt_b, data, None, 0.99)
    assert_same_run(model_c, opt_c, model_b, opt_b)


def test_plain_backward_where_no_hvp_is_needed_else_a_clear_error():
    model = mlp()
    (x, y), = batches(1)
    hd = marthe_ext.HD(model.parameters())
    for _ in range(3):  # HD never needs an HVP
        hd.zero_grad()
        loss_fn(model, x, y).backward()
        hd.step()
    opt = marthe_ext.Marthe(model.parameters(), mu=0.99)
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    opt.step()  # the first step: the tangent is zero, no HVP
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    with pytest.raises(RuntimeError, match=r"the HVP needs the graph: call loss.backward\(create_graph=True\)"):
        opt.step()


def test_no_gradient_at_all_is_a_clear_error():
    opt = marthe_ext.Marthe(mlp().parameters())
    with pytest.raises(RuntimeError, match=r"no parameter has one: call loss.backward\(\)"):
        opt.step()


@pytest.mark.parametrize("engine", ["fd", "forward"])
def test_engines_that_reevaluate_the_loss_need_a_closure(engine):
    model = mlp()
    (x, y), = batches(1)
    opt = marthe_ext.Marthe(model.parameters(), mu=0.99, hvp=engine, model=model)
    for t in range(2):
        opt.zero_grad()
        loss_fn(model, x, y).backward(create_graph=True)
        if t == 0:
            opt.step()  # no HVP on the first step: any engine
    with pytest.raises(ValueError, match=f"hvp='{engine}' re-evaluates the loss"):
        opt.step()


def test_hvp_closure_with_plain_backward_equals_the_closure_path():
    """The usual loop plus hvp="fd" on a sub-batch: .grad from a plain backward."""
    data = batches(3)
    model_c = mlp()
    model_b = copy.deepcopy(model_c)
    kw = dict(mu=0.99, hvp="fd", dynamics="adam", lr=0.01)
    opt_c, opt_b = make_opt(model_c, model=model_c, **kw), make_opt(model_b, model=model_b, **kw)
    for x, y in data:
        opt_c.step(lambda: loss_fn(model_c, x, y), hvp_closure=lambda: loss_fn(model_c, x[:6], y[:6]))
        opt_b.zero_grad()
        loss = loss_fn(model_b, x, y)
        loss.backward()
        opt_b.step(hvp_closure=lambda: loss_fn(model_b, x[:6], y[:6]), loss=loss)
    assert_same_run(model_c, opt_c, model_b, opt_b)


class _Probe(torch.autograd.Function):
    """The identity; its graph node holds an object whose lifetime a weakref can watch."""

    @staticmethod
    def forward(ctx, x, probe):
        ctx.probe = probe
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Marker:
    pass


def test_each_step_releases_the_graph_and_the_reference_cycle():
    model = mlp()
    opt = marthe_ext.Marthe(model.parameters(), mu=0.99)
    enabled = gc.isenabled()
    gc.disable()  # a leak through a reference cycle must not be hidden by a collection
    try:
        for x, y in batches(4):
            marker = _Marker()
            alive = weakref.ref(marker)
            opt.zero_grad()
            h = _Probe.apply(model[0](x), marker)
            loss = nn.functional.cross_entropy(model[2](torch.tanh(h)), y)
            loss.backward(create_graph=True)
            del loss, h, marker
            # Before the step the last layer's .grad holds the double-backward graph, which
            # reaches the probe's node: the probe can die only if step() lets go of it.
            assert alive() is not None
            assert model[2].weight.grad.grad_fn is not None
            opt.step()
            assert alive() is None
            for p in model.parameters():
                assert p.grad.grad_fn is None and not p.grad.requires_grad
    finally:
        if enabled:
            gc.enable()


def test_gradient_accumulation_gives_the_summed_loss_step():
    """Two backward(create_graph=True) calls then one step == one step on L1 + L2."""
    data = batches(6, F64)
    model_a = mlp(F64)
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = make_opt(model_a, mu=0.99), make_opt(model_b, mu=0.99)
    for t in range(3):
        (x1, y1), (x2, y2) = data[2 * t], data[2 * t + 1]
        opt_a.step(lambda: loss_fn(model_a, x1, y1) + loss_fn(model_a, x2, y2))
        opt_b.zero_grad()
        loss_fn(model_b, x1, y1).backward(create_graph=True)
        loss_fn(model_b, x2, y2).backward(create_graph=True)
        opt_b.step()
    assert opt_b.lr != 0.05
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        for k in opt_a.state[pa]:
            torch.testing.assert_close(opt_b.state[pb][k], opt_a.state[pa][k], rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(pb, pa, rtol=1e-12, atol=0)
    assert math.isclose(opt_a.lr, opt_b.lr, rel_tol=1e-11)


def test_observe_loss_gives_a_bare_step_its_loss_summed_over_accumulated_backwards():
    """A trainer's loop calls opt.step() bare: observe_loss hands the step the loss, so the
    default's loss trust region (e) sees what a closure on L1 + L2 would show it."""
    data = batches(6, F64)
    model_a = mlp(F64)
    model_b, model_c = copy.deepcopy(model_a), copy.deepcopy(model_a)
    opt_a, opt_b, opt_c = (make_opt(m, mu=0.99) for m in (model_a, model_b, model_c))
    for t in range(3):
        (x1, y1), (x2, y2) = data[2 * t], data[2 * t + 1]
        opt_a.step(lambda: loss_fn(model_a, x1, y1) + loss_fn(model_a, x2, y2))
        for model, opt in ((model_b, opt_b), (model_c, opt_c)):
            opt.zero_grad()
            for x, y in ((x1, y1), (x2, y2)):
                loss = loss_fn(model, x, y)
                loss.backward(create_graph=True)
                if opt is opt_b:
                    opt.observe_loss(loss)
            returned = opt.step()
            assert (returned is None) == (opt is opt_c)
    sa, sb, sc = opt_a.hyper_state(), opt_b.hyper_state(), opt_c.hyper_state()
    assert float(sb["loss_count"]) == float(sa["loss_count"]) == 3 and float(sc["loss_count"]) == 0
    for k in ("loss_avg", "loss_best", "lr_at_best", "eta"):
        assert math.isclose(float(sb[k]), float(sa[k]), rel_tol=1e-11), k


def test_observe_loss_equals_step_loss_bit_for_bit_and_refuses_a_second_loss():
    data = batches(3)
    model_a = mlp()
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = make_opt(model_a), make_opt(model_b)
    for t, (x, y) in enumerate(data):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward(create_graph=t > 0)
            if opt is opt_a:
                returned = opt.step(loss=loss)
            else:
                opt.observe_loss(loss)
                assert torch.equal(opt.step(), returned)
    assert_same_run(model_a, opt_a, model_b, opt_b)
    x, y = data[0]
    with pytest.raises(TypeError, match="loss tensor you call backward on, got float"):
        opt_b.observe_loss(1.0)
    with pytest.raises(TypeError, match=r"scalar floating-point loss tensor, got torch.float32 of shape \(2,\)"):
        opt_b.observe_loss(torch.ones(2))
    opt_b.observe_loss(loss_fn(model_b, x, y))
    with pytest.raises(ValueError, match="observe_loss.*got a closure too"):
        opt_b.step(lambda: loss_fn(model_b, x, y))
    with pytest.raises(ValueError, match="observe_loss.*got loss= too"):
        opt_b.step(loss=loss_fn(model_b, x, y))


def test_without_zero_grad_the_previous_gradient_is_a_constant_term():
    """No zero_grad: .grad accumulates onto the last step's detached gradient (torch's
    semantics). That equals a closure adding <g_prev, w>: same gradient, no extra Hessian."""
    data = batches(3, F64)
    model_a = mlp(F64)
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = make_opt(model_a, mu=0.99), make_opt(model_b, mu=0.99)
    for x, y in data:
        prev = [None if p.grad is None else p.grad.clone() for p in model_a.parameters()]

        def closure():
            loss = loss_fn(model_a, x, y)
            return loss + sum((g * p).sum() for g, p in zip(prev, model_a.parameters()) if g is not None)

        opt_a.step(closure)
        loss_fn(model_b, x, y).backward(create_graph=True)
        opt_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt_b.state[pb]["tangent"], opt_a.state[pa]["tangent"], rtol=1e-10, atol=1e-14)


def test_zero_grad_without_set_to_none_equals_the_closure_path():
    data = batches(3)
    model_c = mlp()
    model_b = copy.deepcopy(model_c)
    opt_c, opt_b = make_opt(model_c, mu=0.99), make_opt(model_b, mu=0.99)
    for x, y in data:
        opt_c.step(lambda: loss_fn(model_c, x, y))
        opt_b.zero_grad(set_to_none=False)
        loss = loss_fn(model_b, x, y)
        loss.backward(create_graph=True)
        opt_b.step(loss=loss)
    assert_same_run(model_c, opt_c, model_b, opt_b)


# --------------------------------------------------------------------------- group["lr"]
def test_param_groups_carry_the_step_size_as_a_device_tensor():
    model = mlp()
    opt = make_opt(model, lr=0.05, hyper_lr=1e-2)
    for group, scale in zip(opt.param_groups, (0.5, 1.0)):
        assert isinstance(group["lr"], torch.Tensor) and group["lr"].dim() == 0
        assert group["lr"].dtype == F64 and group["lr"].device == model[0].weight.device
        assert float(group["lr"]) == 0.05 * scale
    for x, y in batches(3):
        opt.step(lambda: loss_fn(model, x, y))
        for group, scale in zip(opt.param_groups, (0.5, 1.0)):
            assert float(group["lr"]) == opt.lr * scale
            assert float(group["initial_lr"]) == opt.lr * scale
    assert opt.lr != 0.05
    extra = nn.Linear(2, 2)
    opt.add_param_group(dict(params=extra.parameters(), lr_scale=2.0))
    assert float(opt.param_groups[-1]["lr"]) == opt.lr * 2.0


def _linear_then_exponential(t, start=0.25, total=3, gamma=0.9):
    """The multiplier LinearLR(start, total) chained with ExponentialLR(gamma) applies at step t."""
    return (start + (1 - start) * min(t, total) / total) * gamma ** t


@pytest.mark.parametrize("mu", [1.0, 0.7])
@pytest.mark.parametrize("dyn,nesterov", CASES, ids=CASE_IDS)
def test_scheduler_multiplier_hypergradient_matches_the_unrolled_derivative(dyn, nesterov, mu):
    """With a scheduler multiplier f_t, the tangent is the derivative of the unrolled loop in
    which step t uses the step size (eta + mu^(T-1-t) delta) * lr_scale * f_t (SPEC 4)."""
    T, eta = 6, 0.05 if dyn.startswith("sgd") else 0.01
    data = batches(T, F64)
    loss_flat, shapes, unflatten = flat_mlp([5, 7, 3], *data[0])
    w0 = torch.cat([torch.randn(math.prod(s), dtype=F64) * 0.5 for s in shapes])
    params = [nn.Parameter(p.clone()) for p in unflatten(w0)]
    flat = lambda: torch.cat([p.reshape(-1) for p in params])  # noqa: E731
    groups = [dict(params=params[:2], lr_scale=0.5, weight_decay=0.02), dict(params=params[2:])]
    n_first = sum(p.numel() for p in params[:2])
    s_vec = torch.cat([torch.full((n_first,), 0.5, dtype=F64), torch.ones(w0.numel() - n_first, dtype=F64)])
    wd_vec = torch.cat([torch.full((n_first,), 0.02, dtype=F64), torch.zeros(w0.numel() - n_first, dtype=F64)])
    opt = marthe_ext.Marthe(groups, lr=eta, dynamics=dyn, nesterov=nesterov, mu=mu, hyper_lr=0.0,
                            safeguards=None, backend="torch")
    sched = lr_scheduler.ChainedScheduler([lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=3),
                                           lr_scheduler.ExponentialLR(opt, gamma=0.9)])
    for t in range(T):
        x, y = data[t]
        for group, s in zip(opt.param_groups, (0.5, 1.0)):
            assert math.isclose(float(group["lr"]), eta * s * _linear_then_exponential(t), rel_tol=1e-14)
        opt.step(lambda: loss_flat(flat(), x, y))
        sched.step()
    assert opt.lr == eta

    def unrolled(delta):
        w, state = w0, tuple(torch.zeros_like(w0) for _ in range(STATE_LEN[dyn]))
        for t in range(T):
            x, y = data[t]
            eta_t = (eta + mu ** (T - 1 - t) * delta) * _linear_then_exponential(t)
            w, state = phi(dyn, w, state, eta_t, grad(lambda v: loss_flat(v, x, y)),
                           s=s_vec, wd=wd_vec, nesterov=nesterov, k=t + 1)
        return w

    final, d_final = jvp(unrolled, (torch.tensor(0.0, dtype=F64),), (torch.tensor(1.0, dtype=F64),))
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(flat().detach(), final) < 1e-12
    assert rel(torch.cat([opt.state[p]["tangent"].reshape(-1) for p in params]), d_final) < 1e-8


def _moving_lr_run(make_sched, steps=5):
    model = mlp()
    opt = make_opt(model, lr=0.05, hyper_lr=1e-1)
    sched = make_sched(opt)
    seen = []
    for x, y in batches(steps):
        seen.append([float(g["lr"]) for g in opt.param_groups] + [opt.lr])
        opt.step(lambda: loss_fn(model, x, y))
        sched.step()
    # eta moves on every step but the first (train mode: h = <g, Z> with Z = 0 there)
    assert len({row[-1] for row in seen}) == steps - 1, "eta must move in this test"
    return model, opt, sched, seen


def test_chainable_scheduler_multiplies_the_moving_eta():
    _, opt, sched, seen = _moving_lr_run(lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=4))
    for t, (lr0, lr1, eta) in enumerate(seen):
        f = 0.2 + 0.8 * min(t, 4) / 4
        assert math.isclose(lr0, eta * 0.5 * f, rel_tol=1e-12)
        assert math.isclose(lr1, eta * f, rel_tol=1e-12)
    # what loggers read (Lightning's LearningRateMonitor, the HF Trainer): plain floats
    assert [float(v) for v in sched.get_last_lr()] == [float(g["lr"]) for g in opt.param_groups]


def lam(t):
    return 1.0 / (t + 1)


def test_lambda_lr_follows_eta_through_follow_eta_and_sets_absolute_values_without():
    _, _, _, seen = _moving_lr_run(lambda opt: follow_eta(lr_scheduler.LambdaLR(opt, lam)))
    for t, (lr0, lr1, eta) in enumerate(seen):
        assert math.isclose(lr0, eta * 0.5 * lam(t), rel_tol=1e-12)
        assert math.isclose(lr1, eta * lam(t), rel_tol=1e-12)
    _, _, _, seen = _moving_lr_run(lambda opt: lr_scheduler.LambdaLR(opt, lam))
    for t, (lr0, lr1, _) in enumerate(seen):  # its base LR is eta_0 * lr_scale, copied when built
        assert math.isclose(lr0, 0.05 * 0.5 * lam(t), rel_tol=1e-12)
        assert math.isclose(lr1, 0.05 * lam(t), rel_tol=1e-12)


def test_cosine_annealing_restart_follows_eta():
    """Past T_max CosineAnnealingLR adds a term from its base LR (its 0/0 branch): with
    follow_eta that base is the live eta, so f_t stays (1 + cos(pi t / T)) / 2."""
    _, _, _, seen = _moving_lr_run(
        lambda opt: follow_eta(lr_scheduler.CosineAnnealingLR(opt, T_max=3)), steps=7)
    for t, (_, lr1, eta) in enumerate(seen):
        assert math.isclose(lr1, eta * (1 + math.cos(math.pi * t / 3)) / 2, rel_tol=1e-12, abs_tol=1e-15)


def test_reduce_on_plateau_multiplies_the_moving_eta():
    model = mlp()
    opt = make_opt(model, lr=0.05, hyper_lr=1e-1)
    sched = lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for t, (x, y) in enumerate(batches(5)):
        if t > 0:  # from the second metric on, every one is worse: the LR halves each time
            assert math.isclose(float(opt.param_groups[1]["lr"]), opt.lr * 0.5 ** (t - 1), rel_tol=1e-12)
        opt.step(lambda: loss_fn(model, x, y))
        sched.step(float(t))


def test_sequential_lr_switch_continues_from_the_moving_eta():
    def make(opt):
        warm = lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
        decay = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return follow_eta(lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[2]))

    _, _, _, seen = _moving_lr_run(make, steps=5)
    factors = [0.5, 0.75, 1.0, 0.5, 0.25]  # warm-up, then StepLR restarted from the live base
    for (_, lr1, eta), f in zip(seen, factors):
        assert math.isclose(lr1, eta * f, rel_tol=1e-12)


def test_follow_eta_relinks_after_a_scheduler_checkpoint():
    model, opt, sched, _ = _moving_lr_run(lambda opt: follow_eta(lr_scheduler.LambdaLR(opt, lam)), steps=3)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    sched.load_state_dict(torch.load(buf))
    assert all(not any(b is base for base in opt._protocol.step_sizes.base) for b in sched.base_lrs)
    follow_eta(sched)
    x, y = batches(1)[0]
    opt.step(lambda: loss_fn(model, x, y))
    sched.step()
    assert math.isclose(float(opt.param_groups[1]["lr"]), opt.lr * lam(sched.last_epoch), rel_tol=1e-12)


def test_follow_eta_needs_a_marthe_scheduler():
    sgd = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="follow_eta needs"):
        follow_eta(lr_scheduler.LambdaLR(sgd, lam))


def test_an_lr_written_by_hand_sets_the_multiplier():
    model = mlp()
    opt = make_opt(model, lr=0.05, hyper_lr=1e-1)
    (x, y), = batches(1)
    opt.step(lambda: loss_fn(model, x, y))
    opt.param_groups[1]["lr"] = 0.5 * float(opt.param_groups[1]["lr"])  # a float, as users write it
    w = model[2].weight.detach().clone()
    g = torch.autograd.grad(loss_fn(model, x, y), model[2].weight)[0]
    eta = opt.lr
    opt.step(lambda: loss_fn(model, x, y))
    # train mode updates eta first, then steps with eta_new * 1.0 * f (sgd, no decay in group 1)
    torch.testing.assert_close(model[2].weight.detach(), w - opt.lr * 0.5 * g, rtol=1e-6, atol=1e-7)
    assert opt.lr != eta
    assert isinstance(opt.param_groups[1]["lr"], torch.Tensor)
    assert math.isclose(float(opt.param_groups[1]["lr"]), opt.lr * 0.5, rel_tol=1e-12)


class _NoHostReads(TorchDispatchMode):
    """Fails on every op that copies a device value to the host (item, float, bool, equal)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
             torch.ops.aten.is_nonzero.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read inside step(): {func}")
        return func(*args, **(kwargs or {}))


def test_the_probe_catches_host_reads():
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        float(torch.ones(()) * 2)


@pytest.mark.parametrize("style", ["closure", "backward"])
@pytest.mark.parametrize("mode", ["train", "val"])
def test_step_with_a_scheduler_reads_nothing_on_the_host(style, mode):
    model = mlp()
    opt = make_opt(model, mu=0.99)
    opt._warn_if_skipped = lambda: None  # the CPU-only skipped-step warning reads a CPU flag
    sched = follow_eta(lr_scheduler.LambdaLR(opt, lam))
    xv, yv = batches(1)[0]
    val = (lambda: loss_fn(model, xv, yv)) if mode == "val" else None
    for t, (x, y) in enumerate(batches(3)):
        if style == "backward":
            opt.zero_grad()
            loss_fn(model, x, y).backward(create_graph=True)
        with _NoHostReads():
            if style == "backward":
                opt.step(val_closure=val)
            else:
                opt.step(lambda: loss_fn(model, x, y), val)
        sched.step()
        if t == 1:
            opt.param_groups[0]["lr"] = 0.01  # a host float written by hand is taken without a sync


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_keeps_the_multiplier_and_old_checkpoints_load():
    model = mlp()
    opt = make_opt(model, lr=0.05, hyper_lr=1e-1)
    data = batches(3)
    opt.step(lambda: loss_fn(model, *data[0]))
    opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] * 0.25
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] is not opt.param_groups[0]["lr"]  # a snapshot

    model2 = copy.deepcopy(model)
    opt2 = make_opt(model2, lr=0.05, hyper_lr=1e-1)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    for x, y in data[1:]:
        opt.step(lambda: loss_fn(model, x, y))
        opt2.step(lambda: loss_fn(model2, x, y))
    assert_same_run(model, opt, model2, opt2)
    assert math.isclose(float(opt2.param_groups[0]["lr"]), opt2.lr * 0.5 * 0.25, rel_tol=1e-12)

    old = opt.state_dict()
    for g in old["param_groups"]:
        del g["lr"], g["initial_lr"]
    opt3 = make_opt(copy.deepcopy(model))
    opt3.load_state_dict(old)
    assert float(opt3.param_groups[0]["lr"]) == opt.lr * 0.5
    assert float(opt3.param_groups[1]["lr"]) == opt.lr


def test_a_bad_saved_lr_is_a_clear_error():
    opt = make_opt(mlp())
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = "fast"
    with pytest.raises(ValueError, match="param group 0 of the state dict has an 'lr' entry"):
        opt.load_state_dict(sd)


@pytest.mark.gpu
def test_backward_style_with_a_scheduler_does_not_sync_on_cuda():
    """CUDA's sync debug mode raises on any host synchronisation inside step()."""
    model = mlp().cuda()
    opt = make_opt(model, mu=0.99)
    sched = follow_eta(lr_scheduler.LambdaLR(opt, lam))
    xv, yv = (t.cuda() for t in batches(1)[0])
    data = [(x.cuda(), y.cuda()) for x, y in batches(3)]
    for x, y in data:  # warm up: kernels, backend choice, lazy state
        opt.zero_grad()
        loss_fn(model, x, y).backward(create_graph=True)
        opt.step(val_closure=lambda: loss_fn(model, xv, yv))
        sched.step()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        for x, y in data:
            opt.zero_grad()
            loss_fn(model, x, y).backward(create_graph=True)
            torch.cuda.set_sync_debug_mode("error")
            opt.step(val_closure=lambda: loss_fn(model, xv, yv))
            torch.cuda.set_sync_debug_mode(previous)
            sched.step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert math.isclose(float(opt.param_groups[1]["lr"]), opt.lr * lam(sched.last_epoch), rel_tol=1e-12)
