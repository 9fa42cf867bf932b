"""Run N steps of a fixed problem, optionally resuming from a checkpoint; save the result.

test_optimizer.py runs the uninterrupted and first-half runs in its own process
(``train``) and the resumed halves in a fresh one:
``python checkpoint_worker.py N CONFIG CKPT OUT [CONFIG CKPT OUT ...]``.
The batches depend only on the global step index, so a resumed run sees the same data.
"""
import sys

import torch
from torch import nn

import marthe_ext

CONFIGS = {
    "sgdm-val": dict(dynamics="sgdm", mu=0.99, hyper_lr=1e-3, weight_decay=1e-3, grad_clip=5.0),
    "adam-train": dict(dynamics="adam", mu=0.9, hyper_lr=1e-5, lr=0.003),
    "sgd-auto": dict(dynamics="sgd", mu="auto", hyper_lr=1e-3, hyper_lr_adapt=0.1, safeguards=None),
    "sgdm-robust": dict(dynamics="sgdm", mu=0.99, hyper_lr=1e-3, safeguards="robust"),
}
VAL_MODE = {"sgdm-val": True, "adam-train": False, "sgd-auto": True, "sgdm-robust": True}


def batch(step, split):
    g = torch.Generator().manual_seed(1000 * step + (7 if split == "val" else 0))
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def train(config, n, out, ckpt=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    kwargs = dict(lr=0.05, safeguards=None)
    kwargs.update(CONFIGS[config])
    opt = marthe_ext.Marthe(model.parameters(), **kwargs)
    start = 0
    if ckpt is not None:
        ckpt = torch.load(ckpt)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["steps"]
    for step in range(start, start + n):
        x, y = batch(step, "train")
        xv, yv = batch(step, "val")
        closure = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
        val = (lambda: nn.functional.cross_entropy(model(xv), yv)) if VAL_MODE[config] else None
        opt.step(closure, val)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "steps": start + n}, out)


if __name__ == "__main__":
    n, jobs = int(sys.argv[1]), sys.argv[2:]
    for i in range(0, len(jobs), 3):
        train(jobs[i], n, jobs[i + 2], ckpt=jobs[i + 1])
