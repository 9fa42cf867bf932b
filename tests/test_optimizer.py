"""The optimizer's behaviour: bad input, non-finite steps, checkpoints, module kinds."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import marthe_ext

F64 = torch.float64


def small_mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def data(n=16, dtype=torch.float32):
    return torch.randn(n, 5, dtype=dtype), torch.randint(0, 3, (n,))


def closure_for(model, x, y):
    return lambda: nn.functional.cross_entropy(model(x), y)


# --------------------------------------------------------------------------- bad input
BAD_ARGS = [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(mu=1.5), ValueError, "mu"),
    (dict(mu=-0.1), ValueError, "mu"),
    (dict(mu="sometimes"), ValueError, "mu"),
    (dict(hyper_lr=-1e-3), ValueError, "hyper_lr"),
    (dict(hyper_lr_adapt=-1.0), ValueError, "hyper_lr_adapt"),
    (dict(dynamics="rmsprop"), ValueError, "dynamics"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(hvp="magic"), ValueError, "hvp"),
    (dict(hypergrad="guess"), ValueError, "hypergrad"),
    (dict(momentum=1.0, dynamics="sgdm"), ValueError, "momentum"),
    (dict(betas=(0.9, 1.0), dynamics="adam"), ValueError, r"betas\[1\]"),
    (dict(betas=0.9, dynamics="adam"), TypeError, "betas"),
    (dict(eps=0.0, dynamics="adam"), ValueError, "eps"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(grad_clip=0.0), ValueError, "grad_clip"),
    (dict(nesterov=True, dynamics="sgd"), ValueError, "nesterov"),
    (dict(hvp="forward"), ValueError, "model"),
    (dict(mu="auto", hypergrad="jvp", model=nn.Linear(2, 2)), ValueError, "auto"),
    (dict(model="not a module"), TypeError, "model"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_ARGS, ids=[str(a[0]) for a in BAD_ARGS])
def test_bad_arguments_raise_naming_the_argument(kwargs, exc, match):
    model = small_mlp()
    if "model" in kwargs and isinstance(kwargs["model"], nn.Module):
        kwargs = dict(kwargs, model=model)
    with pytest.raises(exc, match=match):
        marthe_ext.Marthe(model.parameters(), **kwargs)


def test_complex_and_integer_parameters_rejected():
    with pytest.raises(TypeError, match="complex"):
        marthe_ext.Marthe([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(TypeError, match="floating"):
        marthe_ext.Marthe([torch.zeros(3, dtype=torch.int64)])


def test_unknown_group_option_rejected():
    model = small_mlp()
    with pytest.raises(ValueError, match="lr_scale and weight_decay"):
        marthe_ext.Marthe([dict(params=model.parameters(), momentum=0.5)])
    with pytest.raises(ValueError, match="lr_scale"):
        marthe_ext.Marthe([dict(params=model.parameters(), lr_scale=-1.0)])


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: torch.ones(3, requires_grad=True).sum() * torch.ones(2), ValueError, "scalar"),
    (lambda: 1.0, TypeError, "torch.Tensor"),
])
def test_closure_must_return_a_scalar_tensor(bad, exc, match):
    opt = marthe_ext.Marthe(small_mlp().parameters())
    with pytest.raises(exc, match=match):
        opt.step(bad)


def test_step_without_closure_needs_gradients():
    opt = marthe_ext.Marthe(small_mlp().parameters())
    with pytest.raises(RuntimeError, match="no parameter has one: call loss.backward"):
        opt.step()
    with pytest.raises(TypeError, match="closure must be a callable"):
        opt.step("not callable")


def test_sparse_gradients_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = marthe_ext.Marthe(emb.parameters())
    with pytest.raises(ValueError, match="sparse"):
        opt.step(lambda: emb(torch.tensor([1, 2])).sum())


def test_mu_auto_needs_validation_closure():
    model = small_mlp()
    x, y = data()
    opt = marthe_ext.Marthe(model.parameters(), mu="auto")
    with pytest.raises(ValueError, match="val_closure"):
        opt.step(closure_for(model, x, y))


# --------------------------------------------------------------------------- non-finite
class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return weights, state, opt.hyper_state()["eta"].clone(), opt.hyper_state()["step"].clone()


def _assert_unchanged(model, opt, snap):
    weights, state, eta, step = snap
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    assert torch.equal(opt.hyper_state()["eta"], eta)
    assert torch.equal(opt.hyper_state()["step"], step)


@pytest.mark.parametrize("dynamics", ["sgd", "sgdm", "adam", "adamw"])
@pytest.mark.parametrize("poison", ["loss", "grad", "val"])
def test_non_finite_step_is_skipped_and_counted(dynamics, poison):
    model = small_mlp()
    x, y = data()
    xv, yv = data()
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, dynamics=dynamics, mu=0.9, hyper_lr=1e-3,
                            weight_decay=1e-3, grad_clip=10.0)
    val = closure_for(model, xv, yv)
    for _ in range(3):
        opt.step(closure_for(model, x, y), val)
    snap = _snapshot(model, opt)
    nan = torch.tensor(float("nan"))

    def bad_train():
        loss = nn.functional.cross_entropy(model(x), y)
        if poison == "loss":
            return loss * nan
        if poison == "grad":  # finite loss, infinite gradient
            return InfGrad.apply(loss)
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if poison == "val":
            opt.step(closure_for(model, x, y), lambda: val() * nan)
        else:
            opt.step(bad_train, val)
    assert opt.skipped_steps == 1
    if poison == "val":
        # The validation hypergradient comes after the update: only the LR update is skipped.
        assert torch.equal(opt.hyper_state()["eta"], snap[2])
    else:
        _assert_unchanged(model, opt, snap)
    assert sum("non-finite" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure_for(model, x, y), val)
        opt.step(bad_train if poison != "val" else closure_for(model, x, y),
                 val if poison != "val" else (lambda: val() * nan))
    assert opt.skipped_steps == 2
    assert not any("non-finite" in str(w.message) for w in caught), "warned once only"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(opt.lr)


def test_train_mode_nan_skips_before_the_update():
    model = small_mlp()
    x, y = data()
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, dynamics="sgdm", mu=0.9)
    opt.step(closure_for(model, x, y))
    snap = _snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y) * float("inf"))
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1


# --------------------------------------------------------------------------- module kinds
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 2)
        self.unused = nn.Linear(4, 4)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.frozen(self.head(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hvp", ["reverse", "forward", "fd"])
def test_batchnorm_unused_and_frozen_parameters(dtype, hvp):
    model = Mixed().to(dtype)
    x, y = torch.randn(8, 1, 6, 6, dtype=dtype), torch.randint(0, 2, (8,))
    unused = [p.detach().clone() for p in model.unused.parameters()]
    frozen = [p.detach().clone() for p in model.frozen.parameters()]
    conv = model.conv.weight.detach().clone()
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, dynamics="sgdm", mu=0.9, hyper_lr=1e-4,
                            weight_decay=1e-2, hvp=hvp, model=model)
    for _ in range(3):
        loss = opt.step(lambda: nn.functional.cross_entropy(model(x), y))
        assert loss.dtype == dtype and torch.isfinite(loss)
    for p, before in zip(model.unused.parameters(), unused):
        assert torch.equal(p, before)
    for p, before in zip(model.frozen.parameters(), frozen):
        assert torch.equal(p, before)
    assert not torch.equal(model.conv.weight, conv)
    assert opt.state[model.conv.weight]["tangent"].dtype == dtype
    assert int(model.bn.num_batches_tracked) == 3
    assert opt.skipped_steps == 0


def test_lr_is_clamped_at_zero():
    # On 0.5 w^2 with lr 1.9 each step overshoots: g_t = -0.9 g_{t-1}, so h > 0 and a huge
    # beta drives eta below zero, where it must stop.
    w = nn.Parameter(torch.tensor([1.0], dtype=F64))
    opt = marthe_ext.HD([w], lr=1.9, hyper_lr=1e6, safeguards=None)
    lrs = []
    for _ in range(4):
        opt.step(lambda: 0.5 * (w ** 2).sum())
        lrs.append(opt.lr)
    assert lrs[0] == 1.9 and lrs[1] == 0.0 and lrs[-1] == 0.0
    assert opt.skipped_steps == 0


# The alpha rule and the auto-mu rule are replayed step by step in tests/test_hyper_rules.py.


def test_hd_and_rtho_fix_mu():
    model = small_mlp()
    assert marthe_ext.HD(model.parameters()).mu == 0.0
    assert marthe_ext.RTHO(model.parameters()).mu == 1.0
    with pytest.raises(TypeError, match="mu"):
        marthe_ext.HD(model.parameters(), mu=0.5)


# --------------------------------------------------------------------------- checkpoints
def test_state_dict_for_other_parameters_fails_before_changing_anything():
    model = small_mlp()
    x, y = data()
    opt = marthe_ext.Marthe(model.parameters(), dynamics="adam", lr=0.01)
    opt.step(closure_for(model, x, y))
    good = copy.deepcopy(opt.state_dict())

    other = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 3))
    opt_other = marthe_ext.Marthe(other.parameters(), dynamics="adam", lr=0.01)
    opt_other.step(closure_for(other, x, y))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(opt_other.state_dict())
    after = opt.state_dict()
    for key in before["state"]:
        for name in before["state"][key]:
            assert torch.equal(before["state"][key][name], after["state"][key][name])
    assert torch.equal(before["marthe"]["eta"], after["marthe"]["eta"])

    with pytest.raises(ValueError, match="dynamics"):
        marthe_ext.Marthe(model.parameters(), dynamics="sgd").load_state_dict(good)
    with pytest.raises(ValueError, match="Marthe state dict"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    fewer = marthe_ext.Marthe(list(model.parameters())[:2], dynamics="adam")
    with pytest.raises(ValueError, match="parameters"):
        fewer.load_state_dict(good)


WORKER = Path(__file__).with_name("checkpoint_worker.py")
CHECKPOINT_CONFIGS = ["sgdm-val", "adam-train", "sgd-auto", "sgdm-robust"]


def test_checkpoint_resume_in_a_new_process_is_bit_identical(tmp_path):
    from checkpoint_worker import train

    jobs = []
    for config in CHECKPOINT_CONFIGS:
        train(config, 8, tmp_path / f"{config}-full.pt")
        train(config, 4, tmp_path / f"{config}-half.pt")
        jobs += [config, tmp_path / f"{config}-half.pt", tmp_path / f"{config}-resumed.pt"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, str(WORKER), "4", *map(str, jobs)], check=True, env=env, timeout=600)
    for config in CHECKPOINT_CONFIGS:
        a = torch.load(tmp_path / f"{config}-full.pt")
        b = torch.load(tmp_path / f"{config}-resumed.pt")
        half = torch.load(tmp_path / f"{config}-half.pt")
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (config, key)
        assert torch.equal(a["opt"]["marthe"]["eta"], b["opt"]["marthe"]["eta"]), config
        assert float(a["opt"]["marthe"]["eta"]) != float(half["opt"]["marthe"]["eta"]), config
        for key in a["opt"]["state"]:
            for name, t in a["opt"]["state"][key].items():
                assert torch.equal(t, b["opt"]["state"][key][name]), (config, name)
