"""The quick demo: an MLP on scikit-learn's bundled 8x8 digits with MARTHE, HD, RTHO and fixed LRs.

MARTHE runs twice: the paper's algorithm, and with ``safeguards="robust"``.

Every method starts from the same weights at eta0 = 0.01 (a deliberately small LR) and
sees the same mini-batches; the hypergradient methods use the validation loss after each
step (the paper's setting). About 20-30 s on 2 CPU cores.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from . import parallel
from .data import load_splits
from .methods import MethodSpec, Protocol, Trainer
from .models import build_model
from .plots import plot_demo
from .report import markdown_table, write_json
from .training import batch_schedule, evaluate, train_run


@dataclass
class DemoConfig:
    n_train: int = 1000
    n_val: int = 300
    hidden: tuple = (128, 128)
    batch_size: int = 50
    steps: int = 400
    eta0: float = 0.01
    dynamics: str = "sgd"     # or "adam" (e.g. with eta0 = 1e-3)
    beta: float = 1e-3
    mu: float = 0.99
    seed: int = 0


def demo_methods(cfg: DemoConfig) -> list[MethodSpec]:
    return [
        MethodSpec("Constant", {"lr": cfg.eta0}),
        MethodSpec("Constant", {"lr": 10 * cfg.eta0}),
        MethodSpec("HD", {"beta": cfg.beta}),
        MethodSpec("RTHO", {"beta": cfg.beta}),
        MethodSpec("MARTHE", {"beta": cfg.beta, "mu": cfg.mu}),
        # The library's safeguard preset (beta then only seeds its own adaptation).
        MethodSpec("MARTHE", {"beta": cfg.beta, "mu": cfg.mu, "safeguards": "robust"}),
    ]


def run_demo(cfg: DemoConfig = DemoConfig(), out: Optional[Path] = None, progress: bool = True,
             device: str = "cpu") -> list[dict]:
    data = load_splits("digits", cfg.n_train, cfg.n_val, seed=cfg.seed).to(device)
    torch.manual_seed(cfg.seed)
    init = build_model("mlp", data.input_shape, data.num_classes, hidden=cfg.hidden).state_dict()
    batches = batch_schedule(cfg.n_train, cfg.batch_size, cfg.steps, seed=cfg.seed).to(device)
    protocol = Protocol(cfg.dynamics, lr=cfg.eta0)
    rows = []
    for spec in demo_methods(cfg):
        model = build_model("mlp", data.input_shape, data.num_classes, hidden=cfg.hidden).to(device)
        model.load_state_dict(init)
        trainer = Trainer(spec, parallel.wrap(model), protocol)  # DDP under torchrun
        started = time.perf_counter()
        log = train_run(trainer, data.x_train, data.y_train, batches,
                        val_batch=lambda t: (data.x_val, data.y_val),
                        evaluator=lambda: evaluate(model, data.x_val, data.y_val),
                        eval_every=max(1, cfg.steps // 40), progress=progress, desc=spec.label)
        seconds = time.perf_counter() - started
        with trainer.evaluation():
            test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
        rows.append(dict(method=spec.label, val_loss=log.val_loss[-1], val_acc=log.val_acc[-1],
                         test_loss=test_loss, test_acc=test_acc, final_lr=trainer.lr,
                         max_lr=max(log.lrs), seconds=seconds, diverged_at=log.diverged_at,
                         lrs=log.lrs, eval_steps=log.eval_steps, val_loss_curve=log.val_loss))
    if out is not None and parallel.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "demo.json", {"config": asdict(cfg), "runs": rows})
        (out / "demo.md").write_text(demo_table(rows))
        plot_demo(rows, out / "demo.png")
    return rows


def demo_table(rows: list[dict]) -> str:
    header = ["method", "val loss", "val acc", "test acc", "final LR", "max LR", "seconds"]
    return markdown_table(header, [[r["method"], r["val_loss"], r["val_acc"], r["test_acc"],
                                    r["final_lr"], r["max_lr"], round(r["seconds"], 1)] for r in rows])
