"""The benchmarks' pure-autograd baseline does the same work as Marthe.

benchmarks/autograd_baseline.py computes MARTHE the authors' way (flat vectors,
create_graph, .item()); the speed comparison is fair only if it computes the same thing.
In float64 on a small MLP its LR trajectory and final weights equal Marthe's.
"""
import pytest
import torch
from torch import nn

import marthe_ext
from benchmarks.autograd_baseline import AutogradMarthe

STEPS = 8


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(),
                         nn.Linear(7, 3)).double()


def _batches():
    gen = torch.Generator().manual_seed(2)
    def batch():
        return (torch.randn(16, 6, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (16,), generator=gen))
    return [(batch(), batch()) for _ in range(STEPS)]


def _run(make_opt, val_mode):
    model = _model()
    opt = make_opt(model)
    etas = []
    for (x, y), (xv, yv) in _batches():
        closure = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
        val = (lambda: nn.functional.cross_entropy(model(xv), yv)) if val_mode else None  # noqa: E731
        opt.step(closure, val)
        etas.append(opt.lr)
    return torch.tensor(etas, dtype=torch.float64), [p.detach().clone() for p in model.parameters()]


CASES = [
    # (dynamics, extra options, val mode)
    ("sgdm", {}, True),
    ("adam", {}, True),
    ("sgd", {}, True),
    ("adamw", dict(weight_decay=0.1), True),
    ("sgdm", dict(nesterov=True, weight_decay=0.01, grad_clip=0.05), True),
    ("adam", dict(weight_decay=0.01, grad_clip=0.05), True),
    ("sgdm", {}, False),
]


@pytest.mark.parametrize("dynamics,extra,val_mode", CASES,
                         ids=[f"{d}-{'-'.join(e) or 'plain'}-{'val' if v else 'train'}"
                              for d, e, v in CASES])
def test_same_eta_trajectory_as_marthe(dynamics, extra, val_mode):
    adam = dynamics.startswith("adam")
    kwargs = dict(lr=0.01 if adam else 0.1, dynamics=dynamics, mu=0.99,
                  hyper_lr=1e-4 if adam else 0.05, **extra)
    eta_ref, w_ref = _run(lambda m: marthe_ext.Marthe(m.parameters(), backend="torch", safeguards=None, **kwargs),
                          val_mode)
    eta, w = _run(lambda m: AutogradMarthe(m.parameters(), **kwargs), val_mode)

    # The LR must actually move, or the comparison would prove nothing about the tangents.
    assert (eta_ref - eta_ref[0]).abs().max() > 1e-3 * eta_ref[0]
    torch.testing.assert_close(eta, eta_ref, rtol=1e-10, atol=0)
    for a, b in zip(w, w_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rejects_unknown_dynamics():
    with pytest.raises(ValueError, match="dynamics must be one of"):
        AutogradMarthe([torch.zeros(2, requires_grad=True)], dynamics="rmsprop")
