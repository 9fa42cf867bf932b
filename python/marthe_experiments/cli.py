"""Command line: ``python python/run.py {demo,e1,e2,safeguards,modes} [options]`` (or ``python -m marthe_experiments``)."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import parallel
from .data import DATASETS, DataError
from .models import MODELS


def _floats(text: str) -> tuple:
    return tuple(float(v) for v in text.split(",") if v)


def _words(text: str) -> tuple:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(",") if v)


def _key_value(text: str) -> tuple:
    """KEY=VALUE with VALUE read as None, a bool, an int, a float or else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    words = {"none": None, "true": True, "false": False}
    if raw.lower() in words:
        return key, words[raw.lower()]
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    return key, raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marthe_experiments",
        description="Reproduce the MARTHE paper's comparisons with marthe_ext (demo, E1, E2).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, default_out: str, threads: Optional[int] = None) -> None:
        p.add_argument("--out", type=Path, default=Path(default_out), help="output directory (default: %(default)s)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (cuda uses marthe_ext's fast backends)")
        p.add_argument("--threads", type=int, default=threads,
                       help=f"torch CPU threads (default: {threads or 'torch decides'}; 1 is much "
                            f"faster on a machine busy with other work)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def presets(p: argparse.ArgumentParser, names: Sequence[str]) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--preset", choices=names, default="full",
                           help="settings to start from (default: %(default)s, the paper's)")
        group.add_argument("--quick", dest="preset", action="store_const", const="quick",
                           help="tiny settings: minutes on 2 CPU cores")
        if "medium" in names:
            group.add_argument("--medium", dest="preset", action="store_const", const="medium",
                               help="the paper's sizes with fewer LRS-OPT iterations and a smaller grid")

    def data_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", choices=DATASETS, default=None,
                       help="digits (bundled), fashion-mnist (Debian's dataset-fashion-mnist), mnist, cifar10")
        p.add_argument("--data-dir", default=None, help="directory with the IDX files or cifar-10-batches-py")
        p.add_argument("--n-train", type=int, default=None)
        p.add_argument("--n-val", type=int, default=None)
        p.add_argument("--n-test", type=int, default=None)

    def hyper_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--hvp", choices=("reverse", "forward", "fd", "auto"), default=None,
                       help="Hessian-vector product engine of marthe_ext (default: reverse)")
        p.add_argument("--hypergrad", choices=("grad", "jvp", "fd"), default=None,
                       help="how <grad E, Z> is computed (default: grad)")
        p.add_argument("--val-batch", type=int, default=None,
                       help="validation examples per hypergradient")
        p.add_argument("--marthe-option", dest="marthe_options", type=_key_value, action="append", default=None,
                       metavar="KEY=VALUE",
                       help="extra marthe_ext.Marthe argument for HD/RTHO/MARTHE, repeatable "
                            "(e.g. max_lr_change=2 or hypergrad_norm=rms)")

    demo = sub.add_parser("demo", help="MLP on the bundled 8x8 digits: MARTHE, HD, RTHO, fixed LR (~30 s)")
    # The demo's tensors are too small to gain from threads, and threads cost a lot on a busy machine.
    common(demo, "runs/demo", threads=1)
    demo.add_argument("--steps", type=int, default=None)
    demo.add_argument("--beta", type=float, default=None, help="hyper-learning rate of HD/RTHO/MARTHE")
    demo.add_argument("--dynamics", choices=("sgd", "adam"), default=None, help="inner optimizer (default sgd)")
    demo.add_argument("--eta0", type=float, default=None, help="initial LR (default 0.01)")
    demo.add_argument("--batch-size", type=int, default=None,
                      help="training batch (default 50); under torchrun split evenly over the processes")

    e1 = sub.add_parser("e1", help="LR-schedule study: LRS-OPT vs MARTHE/HD/RTHO/Exponential (MLP, SGD)")
    common(e1, "runs/e1")
    presets(e1, ("quick", "medium", "full"))
    data_opts(e1)
    hyper_opts(e1)
    e1.add_argument("--steps", type=int, default=None, help="horizon T (paper: 512)")
    e1.add_argument("--hidden", type=_ints, default=None, help="MLP widths, e.g. 500,500,500")
    e1.add_argument("--lrs-iterations", type=int, default=None, help="LRS-OPT outer iterations (0: skip)")
    e1.add_argument("--lrs-method", choices=("gd", "rms"), default=None,
                    help="LRS-OPT outer descent: plain projected GD (default) or RMS-preconditioned")
    e1.add_argument("--checkpoint-every", type=int, default=None,
                    help="LRS-OPT keeps every k-th state and recomputes the rest (default: store all if < 4 GiB)")
    e1.add_argument("--mus", type=_floats, default=None, help="comma-separated mu grid (0 = HD, 1 = RTHO)")
    e1.add_argument("--betas", type=_floats, default=None, help="comma-separated beta grid")
    e1.add_argument("--exp-samples", type=int, default=None, help="Exponential gammas to sample")
    e1.add_argument("--eval-every", type=int, default=None)

    e2 = sub.add_parser("e2", help="CNN protocol: VGG/ResNet with SGDM and Adam, several seeds")
    common(e2, "runs/e2")
    presets(e2, ("quick", "full"))
    data_opts(e2)
    hyper_opts(e2)
    e2.add_argument("--models", type=_words, default=None, help=f"comma-separated, from {MODELS[1:]}")
    e2.add_argument("--protocols", type=_words, default=None, help="comma-separated, from sgdm,adam")
    e2.add_argument("--methods", type=_words, default=None,
                    help="comma-separated, from Exponential,HD,RTHO,MARTHE,SF,Prodigy")
    e2.add_argument("--epochs", type=int, default=None)
    e2.add_argument("--configs", type=int, default=None, help="random-search samples per method")
    e2.add_argument("--seeds", type=int, default=None)
    e2.add_argument("--width", type=int, default=None, help="channels of the first block")
    e2.add_argument("--batch-size", type=int, default=None,
                    help="training batch (default 128; under torchrun: divisible by the process count)")
    return parser


def _device(name: str) -> str:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    return str(device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["safeguards"]:  # the issue-8 study has its own parser
        from .safeguard_study import main as safeguard_main

        return safeguard_main(argv[1:])
    if argv[:1] == ["modes"]:  # the issue-14 study of the cheaper modes has its own parser
        from .modes_study import main as modes_main

        return modes_main(argv[1:])
    args = build_parser().parse_args(argv)
    # The torch reference backend is the expected path on CPU; saying so on every run is noise.
    warnings.filterwarnings("ignore", message="marthe_ext. no fast backend")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parallel.setup(_device(args.device))  # under torchrun: join the process group
    if not parallel.is_main():  # rank 0 reports; the others train silently
        sys.stdout = open(os.devnull, "w")
    progress = not args.no_progress and parallel.is_main()
    started = time.perf_counter()
    try:
        if args.command == "demo":
            from .demo import DemoConfig, demo_table, run_demo

            cfg = DemoConfig(seed=args.seed)
            if args.steps:
                cfg.steps = args.steps
            if args.beta:
                cfg.beta = args.beta
            if args.dynamics:
                cfg.dynamics = args.dynamics
            if args.eta0:
                cfg.eta0 = args.eta0
            if args.batch_size:
                cfg.batch_size = args.batch_size
            rows = run_demo(cfg, out=args.out, progress=progress, device=device)
            print(f"Digits MLP, {cfg.dynamics} from eta0 = {cfg.eta0}, {cfg.steps} steps; hypergradient methods: beta = "
                  f"{cfg.beta}, MARTHE mu = {cfg.mu}")
            print(demo_table(rows))
            print(f"LR schedules and validation losses: {args.out / 'demo.png'}")
        elif args.command == "e1":
            from .e1 import e1_config, run_e1

            cfg = e1_config(args.preset, dataset=args.dataset, data_dir=args.data_dir, n_train=args.n_train,
                            n_val=args.n_val, n_test=args.n_test, steps=args.steps, hidden=args.hidden,
                            lrs_iterations=args.lrs_iterations, lrs_method=args.lrs_method,
                            checkpoint_every=args.checkpoint_every,
                            mus=args.mus, betas=args.betas, exp_samples=args.exp_samples,
                            val_batch=args.val_batch, eval_every=args.eval_every, hvp=args.hvp,
                            hypergrad=args.hypergrad, marthe_options=args.marthe_options, seed=args.seed)
            run_e1(cfg, args.out, progress=progress, device=device)
            if parallel.is_main():  # the only rank that writes the table
                print((args.out / "e1_table.md").read_text())
        else:
            from .e2 import e2_config, run_e2

            cfg = e2_config(args.preset, dataset=args.dataset, data_dir=args.data_dir, n_train=args.n_train,
                            n_val=args.n_val, n_test=args.n_test, models=args.models, protocols=args.protocols,
                            methods=args.methods, epochs=args.epochs, configs=args.configs, seeds=args.seeds,
                            width=args.width, batch_size=args.batch_size, val_batch=args.val_batch, hvp=args.hvp,
                            hypergrad=args.hypergrad, marthe_options=args.marthe_options, seed=args.seed)
            run_e2(cfg, args.out, progress=progress, device=device)
            if parallel.is_main():
                print((args.out / "e2_table.md").read_text())
        parallel.wait_for_all()
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        parallel.teardown()
    print(f"results in {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0
