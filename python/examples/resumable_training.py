"""A training loop that survives being killed: checkpoint every few steps, resume on start.

    python python/examples/resumable_training.py --steps 60 --ckpt run/last.pt --out run/final.pt

Run it again with the same arguments after a crash (even SIGKILL in the middle of a
checkpoint write): it resumes from ``--ckpt`` and ends bit-identical, on the CPU, to a
run that was never interrupted. What that takes: atomic checkpoint writes
(``marthe_ext.checkpoint``), batches that depend only on the step index, and the RNG
state (dropout here) saved with the model and the optimizer. tests/test_resume.py kills
it at random steps.
"""
import argparse
import os

import torch
from torch import nn

import marthe_ext
from marthe_ext import checkpoint


def batch(step: int, split: str):
    g = torch.Generator().manual_seed(1000 * step + (7 if split == "val" else 0))
    return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 3))
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, dynamics="sgdm", mu=0.99,
                            weight_decay=1e-3, grad_clip=5.0)  # the default safeguards
    return model, opt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--ckpt", required=True, help="the checkpoint to resume from and update")
    ap.add_argument("--out", required=True, help="the final state, written at the end")
    ap.add_argument("--every", type=int, default=1, help="checkpoint every N steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # bit-identical runs: the same reduction order every time
    model, opt = build()
    start = 0
    if os.path.exists(args.ckpt):
        extra = checkpoint.load(args.ckpt, model=model, optimizer=opt)
        start = int(extra["step"])
        torch.set_rng_state(extra["rng"])
        print(f"resumed at step {start}", flush=True)
    loss_fn = nn.functional.cross_entropy
    for step in range(start, args.steps):
        x, y = batch(step, "train")
        xv, yv = batch(step, "val")
        opt.step(lambda: loss_fn(model(x), y), val_closure=lambda: loss_fn(model(xv), yv))
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            checkpoint.save(args.ckpt, model=model, optimizer=opt, step=step + 1,
                            rng=torch.get_rng_state())
        print(f"step {step + 1}", flush=True)
    checkpoint.save(args.out, model=model, optimizer=opt, step=args.steps,
                    rng=torch.get_rng_state())


if __name__ == "__main__":
    main()
