"""Whole training runs through ``Marthe(backend=...)`` track the torch reference backend.

Backends that cannot run here are skipped with their reason, except those listed in
``MARTHE_REQUIRE_BACKENDS`` (CI lists the ones it builds), which must run.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import marthe_ext
from required_backends import backend_or_skip


CONFIGS = {
    "sgd": dict(dynamics="sgd", lr=0.1, weight_decay=1e-3),
    "sgdm-nesterov-clip": dict(dynamics="sgdm", lr=0.05, nesterov=True, grad_clip=0.05),
    "adam": dict(dynamics="adam", lr=0.01, weight_decay=1e-3, hyper_lr=1e-4),
    "adamw-rtho": dict(dynamics="adamw", lr=0.01, weight_decay=1e-2, mu=1.0, hyper_lr=1e-4),
    "sgdm-hd-train": dict(dynamics="sgdm", lr=0.05, mu=0.0),
}


def train(backend, cfg, dtype, steps=12, val=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 33), nn.Tanh(), nn.Linear(33, 5)).to(dtype)
    x, y = torch.randn(40, 7, dtype=dtype), torch.randint(0, 5, (40,))
    xv, yv = torch.randn(40, 7, dtype=dtype), torch.randint(0, 5, (40,))
    kwargs = dict(mu=0.9, hyper_lr=1e-3)
    kwargs.update(cfg)
    groups = [dict(params=model[0].parameters(), lr_scale=0.5),
              dict(params=model[2].parameters(), weight_decay=0.0)]
    opt = marthe_ext.Marthe(groups, backend=backend, **kwargs)
    etas = []
    for _ in range(steps):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y),
                 (lambda: nn.functional.cross_entropy(model(xv), yv)) if val and cfg.get("mu", 1) != 0 else None)
        etas.append(opt.lr)
    assert opt.backend == backend
    return torch.tensor(etas, dtype=torch.float64), model, opt


def rel(a, b):
    """Relative error; an all-zero reference (e.g. HD's momentum tangent) must be matched exactly."""
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("backend,dtype,tol", [
    pytest.param("triton", torch.float32, 1e-4, marks=pytest.mark.triton),
    pytest.param("cpu", torch.float32, 1e-5, marks=pytest.mark.ext),
    pytest.param("cpu", torch.float64, 1e-12, marks=pytest.mark.ext),
])
def test_training_run_tracks_the_torch_backend(backend, dtype, tol, cfg):
    backend_or_skip(backend)
    ref_etas, ref_model, ref_opt = train("torch", CONFIGS[cfg], dtype)
    etas, model, opt = train(backend, CONFIGS[cfg], dtype)
    assert len(set(ref_etas.tolist())) > 2, "eta must move in this test"
    assert rel(etas, ref_etas) < tol
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert rel(p.detach().double(), q.detach().double()) < tol
        for name, t in ref_opt.state[q].items():
            assert rel(opt.state[p][name].double(), t.double()) < max(tol, 1e-4 if dtype == torch.float32 else tol), name


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton),
                                     pytest.param("cpu", marks=pytest.mark.ext)])
def test_non_finite_step_is_skipped_by_the_fast_backend(backend):
    backend_or_skip(backend)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, dynamics="adam", mu=0.9, backend=backend)
    opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y) * float("nan"))
    assert opt.skipped_steps == 1
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    after = opt.state_dict()
    for k in before["state"]:
        for name, t in before["state"][k].items():
            assert torch.equal(t, after["state"][k][name])
    assert torch.equal(before["marthe"]["step"], after["marthe"]["step"])


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton),
                                     pytest.param("cpu", marks=pytest.mark.ext)])
def test_conv_net_with_strided_hvps(backend):
    """Conv weights' double-backward HVPs come back with permuted strides: the optimizer
    hands the kernels contiguous buffers."""
    backend_or_skip(backend)
    results = {}
    for name in ("torch", backend):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 4 * 4, 3))
        x, y = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
        opt = marthe_ext.Marthe(model.parameters(), lr=0.05, dynamics="sgdm", mu=0.9, hyper_lr=1e-4,
                                backend=name)
        for _ in range(3):
            opt.step(lambda: nn.functional.cross_entropy(model(x), y))
        results[name] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert rel(results[backend], results["torch"]) < 1e-5
