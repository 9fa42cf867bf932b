"""Plain functional reference of one optimizer step, Phi(w, state, eta), for the oracles.

Written independently of the library (SPEC section 2, steps 1 and 4 without the tangent):
the tests differentiate it with torch.func to get A Z and dPhi/deta exactly.
"""
from __future__ import annotations

import math

import torch

STATE_LEN = {"sgd": 0, "sgdm": 1, "adam": 2, "adamw": 2}


def phi(dyn, w, state, eta, grad_fn, *, s=1.0, wd=0.0, momentum=0.9, nesterov=False,
        betas=(0.9, 0.999), eps=1e-8, k=1, clip=None):
    """One step of ``dyn`` on a flat weight vector; returns (w', state')."""
    g = grad_fn(w)
    if dyn != "adamw":
        g = g + wd * w
    if clip is not None:
        g = torch.clamp(g, -clip, clip)
    lr = eta * s
    if dyn == "sgd":
        return w - lr * g, ()
    if dyn == "sgdm":
        v = momentum * state[0] + g
        d = g + momentum * v if nesterov else v
        return w - lr * d, (v,)
    b1, b2 = betas
    m = b1 * state[0] + (1 - b1) * g
    v = b2 * state[1] + (1 - b2) * g * g
    u = (m / (1 - b1 ** k)) / (torch.sqrt(v) / math.sqrt(1 - b2 ** k) + eps)
    w_dec = w * (1 - lr * wd) if dyn == "adamw" else w
    return w_dec - lr * u, (m, v)


def flat_mlp(sizes, x, y):
    """A tanh MLP whose parameters are one flat vector; returns (loss_fn(flat), shapes)."""
    shapes = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        shapes += [(b, a), (b,)]
    numels = [math.prod(s) for s in shapes]

    def unflatten(flat):
        return [t.reshape(s) for t, s in zip(torch.split(flat, numels), shapes)]

    def loss_fn(flat, xb=x, yb=y):
        h = xb
        ps = unflatten(flat)
        for i in range(0, len(ps), 2):
            h = h @ ps[i].T + ps[i + 1]
            if i + 2 < len(ps):
                h = torch.tanh(h)
        return torch.nn.functional.cross_entropy(h, yb)

    return loss_fn, shapes, unflatten
