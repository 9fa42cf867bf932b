"""The HVP engines agree with each other (fd to its truncation error), on an MLP, a CNN with
BatchNorm (train and eval mode) and a model with dropout; the hypergradient modes agree."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import marthe_ext
from marthe_ext.hvp import ENGINES

F64 = torch.float64


def rel_err(a, b):
    """Relative error of two tensors, or of two lists taken as one concatenated vector
    (a conv bias before BatchNorm has an exactly-zero gradient: only noise per tensor)."""
    if isinstance(a, (list, tuple)):
        a = torch.cat([t.reshape(-1) for t in a])
        b = torch.cat([t.reshape(-1) for t in b])
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def mlp():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def bn_cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()


def dropout_mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).double()


MODELS = {
    "mlp": (mlp, (7, 6)),
    "bn_train": (bn_cnn, (6, 2, 5, 5)),
    "bn_eval": (bn_cnn, (6, 2, 5, 5)),
    "dropout": (dropout_mlp, (7, 6)),
}


def _setup(name):
    make, shape = MODELS[name]
    model = make()
    model.train(name != "bn_eval")
    x = torch.randn(*shape, dtype=F64)
    y = torch.randint(0, 3, (shape[0],))
    params = list(model.parameters())
    tangents = [torch.randn_like(p) for p in params]
    return model, (lambda: nn.functional.cross_entropy(model(x), y)), params, tangents


def _run(engine, name):
    torch.manual_seed(1)
    model, closure, params, tangents = _setup(name)
    torch.manual_seed(2)  # same dropout mask for every engine
    loss, grads, hvps = ENGINES[engine](closure, params, tangents, True, model)
    buffers = [b.clone() for b in model.buffers()]
    return loss, grads, hvps, buffers


@pytest.mark.parametrize("name", list(MODELS))
def test_hvp_engines_agree(name):
    ref_loss, ref_g, ref_h, ref_buf = _run("reverse", name)
    for engine, tol in (("forward", 1e-10), ("fd", 1e-5)):
        loss, g, h, buf = _run(engine, name)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-14)
        assert rel_err(g, ref_g) < 1e-13
        assert rel_err(h, ref_h) < tol, engine
        # Running statistics move exactly once per step, as in a plain training step.
        for a, b in zip(buf, ref_buf):
            assert torch.equal(a, b), engine


def test_batchnorm_statistics_equal_a_plain_training_step():
    torch.manual_seed(0)
    model = bn_cnn()
    plain = copy.deepcopy(model)
    x = torch.randn(6, 2, 5, 5, dtype=F64)
    y = torch.randint(0, 3, (6,))
    opt = marthe_ext.Marthe(model.parameters(), lr=0.1, mu=0.9, hvp="forward", model=model)
    for _ in range(2):  # the second step runs the HVP
        with torch.no_grad():  # the plain model sees the same weights, keeps its own buffers
            for q, p in zip(plain.parameters(), model.parameters()):
                q.copy_(p)
        nn.functional.cross_entropy(plain(x), y)
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    assert torch.equal(model[1].running_mean, plain[1].running_mean)
    assert torch.equal(model[1].running_var, plain[1].running_var)
    assert int(model[1].num_batches_tracked) == 2


def test_fd_engine_restores_weights_bit_exactly():
    model, closure, params, tangents = _setup("mlp")
    before = [p.detach().clone() for p in params]
    ENGINES["fd"](closure, params, tangents, True, model)
    for a, b in zip(params, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dynamics", ["sgdm", "adam"])
def test_hypergradient_modes_agree(dynamics):
    torch.manual_seed(0)
    base = mlp()
    x, y = torch.randn(9, 6, dtype=F64), torch.randint(0, 3, (9,))
    xv, yv = torch.randn(9, 6, dtype=F64), torch.randint(0, 3, (9,))
    results = {}
    for mode in ("grad", "jvp", "fd"):
        model = copy.deepcopy(base)
        opt = marthe_ext.Marthe(model.parameters(), lr=0.05, dynamics=dynamics, mu=0.9, hyper_lr=1e-3,
                                hypergrad=mode, model=model)
        trace = []
        for _ in range(3):
            opt.step(lambda: nn.functional.cross_entropy(model(x), y),
                     lambda: nn.functional.cross_entropy(model(xv), yv))
            trace.append(opt.last_hypergrad)
        results[mode] = torch.tensor(trace, dtype=F64)
    assert results["grad"].abs().min() > 0
    assert rel_err(results["jvp"], results["grad"]) < 1e-10
    assert rel_err(results["fd"], results["grad"]) < 1e-6


def test_jvp_hypergrad_needs_model():
    with pytest.raises(ValueError, match="model"):
        marthe_ext.Marthe(mlp().parameters(), hypergrad="jvp")


@pytest.mark.parametrize("name", ["bn_train", "dropout"])
def test_hvp_auto_times_the_exact_engines_once_and_steps_like_reverse(name):
    runs = {}
    for hvp in ("auto", "reverse"):
        torch.manual_seed(1)
        model, closure, params, _ = _setup(name)
        opt = marthe_ext.Marthe(params, lr=0.05, mu=0.9, hvp=hvp, model=model)
        torch.manual_seed(2)
        for _ in range(3):
            opt.step(closure)
        runs[hvp] = (opt, [p.detach().clone() for p in params], [b.clone() for b in model.buffers()])
    opt = runs["auto"][0]
    assert set(opt.hvp_timings) == {"reverse", "forward"}
    assert opt.hvp_engine == min(opt.hvp_timings, key=opt.hvp_timings.get)
    # Same batch statistics, dropout masks and buffer updates as a run without the timing.
    assert rel_err(runs["auto"][1], runs["reverse"][1]) < 1e-12
    for a, b in zip(runs["auto"][2], runs["reverse"][2]):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_hvp_auto_without_model_uses_reverse():
    model, closure, params, _ = _setup("mlp")
    opt = marthe_ext.Marthe(params, lr=0.05, mu=0.9, hvp="auto")
    for _ in range(2):
        opt.step(closure)
    assert opt.hvp_engine == "reverse" and set(opt.hvp_timings) == {"reverse"}


def test_fd_hypergrad_reports_an_error_bound():
    model, closure, params, _ = _setup("mlp")
    opt = marthe_ext.Marthe(params, lr=0.05, mu=0.9, hypergrad="fd")
    assert opt.last_hypergrad_error is None
    opt.step(closure, closure)
    opt.step(closure, closure)
    assert 0 < opt.last_hypergrad_error < 1e-6 * abs(opt.last_hypergrad)


def test_fd_engine_draws_fresh_dropout_masks_each_step():
    runs = {}
    for hvp in ("fd", "reverse"):
        torch.manual_seed(1)
        model, closure, params, _ = _setup("dropout")
        opt = marthe_ext.Marthe(params, lr=0.05, mu=0.9, hvp=hvp, model=model)
        torch.manual_seed(2)
        for _ in range(3):
            opt.step(closure)
        runs[hvp] = ([p.detach().clone() for p in params], torch.rand(3))
    assert rel_err(runs["fd"][0], runs["reverse"][0]) < 1e-7
    assert torch.equal(runs["fd"][1], runs["reverse"][1]), "the RNG advanced as in a plain step"


def test_hvp_on_a_sub_batch_equals_the_hvp_of_the_sub_batch_loss():
    torch.manual_seed(0)
    model = bn_cnn()
    x, y = torch.randn(8, 2, 5, 5, dtype=F64), torch.randint(0, 3, (8,))
    twin = copy.deepcopy(model)
    full = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    sub = lambda m: nn.functional.cross_entropy(m(x[:4]), y[:4])  # noqa: E731
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, mu=0.9, hyper_lr=0.0, model=model)
    opt.step(lambda: full(model))
    tangents = [opt.state[p]["tangent"].clone() for p in model.parameters()]
    twin.load_state_dict(model.state_dict())
    opt.step(lambda: full(model), hvp_closure=lambda: sub(model))
    # The same step by hand: gradient from the full batch, HVP from the sub-batch only.
    params = list(twin.parameters())
    _, g, _ = ENGINES["reverse"](lambda: full(twin), params, tangents, False)
    buffers = [b.clone() for b in twin.buffers()]
    _, _, hv = ENGINES["reverse"](lambda: sub(twin), params, tangents, True)
    for b, s in zip(twin.buffers(), buffers):
        b.copy_(s)
    for p, gi in zip(model.parameters(), g):
        assert torch.equal(p.grad, gi)
    for b, s in zip(model.buffers(), twin.buffers()):
        assert torch.equal(b, s), "BatchNorm statistics move once, with the full batch"
    z_sgd = [0.9 * (z - 0.05 * h) - gi for z, h, gi in zip(tangents, hv, g)]
    assert rel_err([opt.state[p]["tangent"] for p in model.parameters()], z_sgd) < 1e-12


def test_preserved_buffers_keeps_validation_data_out_of_the_running_statistics():
    """A train-mode validation closure wrapped in preserved_buffers: the hypergradient uses
    the validation batch statistics, the running statistics move only with the training
    batch (as a plain step), and the validation loss stays differentiable after the block."""
    torch.manual_seed(0)
    model = bn_cnn()
    plain = copy.deepcopy(model)
    x, xv = torch.randn(6, 2, 5, 5, dtype=F64), torch.randn(6, 2, 5, 5, dtype=F64) + 3
    y, yv = torch.randint(0, 3, (6,)), torch.randint(0, 3, (6,))

    def val_closure():
        with marthe_ext.preserved_buffers(model):
            return nn.functional.cross_entropy(model(xv), yv)

    opt = marthe_ext.Marthe(model.parameters(), lr=0.1, mu=0.9, hyper_lr=1e-3, model=model)
    for _ in range(2):
        with torch.no_grad():  # the plain model sees the same weights, keeps its own buffers
            for q, p in zip(plain.parameters(), model.parameters()):
                q.copy_(p)
        nn.functional.cross_entropy(plain(x), y)
        opt.step(lambda: nn.functional.cross_entropy(model(x), y), val_closure=val_closure)
    assert torch.equal(model[1].running_mean, plain[1].running_mean)
    assert torch.equal(model[1].running_var, plain[1].running_var)
    assert int(model[1].num_batches_tracked) == 2
    assert opt.last_hypergrad != 0.0
    # Without the helper the validation batch (shifted by +3) leaks into the running mean.
    leaky = copy.deepcopy(plain)
    nn.functional.cross_entropy(leaky(xv), yv)
    assert not torch.allclose(leaky[1].running_mean, plain[1].running_mean)


# Regression losses through the forward engine. torch's forward-mode derivative of
# mse_loss_backward (reduction "mean") fails on a target without a tangent (pytorch#123996);
# the engine gives the target a zero tangent. A target that depends on the weights keeps its
# own tangent.
MSE_CLOSURES = {
    "functional": lambda m, x, y: nn.functional.mse_loss(m(x), y),
    "keyword target": lambda m, x, y: nn.functional.mse_loss(input=m(x), target=y),
    "module": lambda m, x, y: nn.MSELoss()(m(x), y),
    "sum": lambda m, x, y: nn.functional.mse_loss(m(x), y, reduction="sum"),
    "target from the weights": lambda m, x, y: nn.functional.mse_loss(m(x), torch.tanh(m(2 * x))),
}


@pytest.mark.parametrize("loss", list(MSE_CLOSURES))
@pytest.mark.parametrize("engine", ["forward", "forward-eager"])
def test_forward_engine_takes_mse_loss_and_agrees_with_reverse(loss, engine):
    torch.manual_seed(3)
    model = mlp()
    x, y = torch.randn(7, 6, dtype=F64), torch.randn(7, 3, dtype=F64)
    params = list(model.parameters())
    tangents = [torch.randn_like(p) for p in params]
    closure = lambda: MSE_CLOSURES[loss](model, x, y)  # noqa: E731
    ref_loss, ref_g, ref_h = ENGINES["reverse"](closure, params, tangents, True)
    out_loss, out_g, out_h = ENGINES[engine](closure, params, tangents, True, model)
    assert float(out_loss) == pytest.approx(float(ref_loss), rel=1e-14)
    assert rel_err(out_g, ref_g) < 1e-12 and rel_err(out_h, ref_h) < 1e-12


def test_marthe_with_hvp_forward_trains_an_mse_regression_like_reverse():
    torch.manual_seed(4)
    x, y, xv, yv = (torch.randn(16, 6, dtype=F64), torch.randn(16, 3, dtype=F64),
                    torch.randn(8, 6, dtype=F64), torch.randn(8, 3, dtype=F64))
    start = mlp()
    runs = {}
    for engine in ("reverse", "forward"):
        model = copy.deepcopy(start)
        opt = marthe_ext.Marthe(model.parameters(), lr=0.05, model=model, hvp=engine)
        for _ in range(5):
            opt.step(lambda: nn.functional.mse_loss(model(x), y), lambda: nn.functional.mse_loss(model(xv), yv))
        runs[engine] = (opt.lr, [p.detach().clone() for p in model.parameters()])
    assert runs["forward"][0] == pytest.approx(runs["reverse"][0], rel=1e-10)
    assert rel_err(runs["forward"][1], runs["reverse"][1]) < 1e-12


def test_forward_engine_names_the_exact_alternative_for_an_op_without_forward_mode():
    from marthe_ext.compiled import CompiledModelError

    model = mlp()
    x, y = torch.randn(7, 6, dtype=F64), torch.randn(7, 3, dtype=F64)
    opt = marthe_ext.Marthe(model.parameters(), model=model, hvp="forward")
    closure = lambda: nn.functional.huber_loss(model(x), y)  # noqa: E731
    opt.step(closure)  # the first step takes no HVP (the tangent is still zero)
    with pytest.raises(CompiledModelError, match="huber_loss.*eager model use hvp='reverse'"):
        opt.step(closure)
