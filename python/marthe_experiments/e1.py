"""E1: the paper's learning-rate-schedule study (Donini et al. 2020, section 5.1).

An MLP trained by plain SGD for T steps on fixed mini-batches from the same initial
weights; E = validation loss after T steps. Compared: LRS-OPT (the offline optimal
schedule, ``lrs_opt``), MARTHE over a grid of (mu, beta) with mu = 0 reported as HD and
mu = 1 as RTHO, Exponential decay eta0 * gamma^t with gamma sampled log-uniformly in
[0.9, 1], and the constant eta0 that LRS-OPT starts from. Each family is represented by
its configuration with the lowest E; every run is kept in the raw results.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import parallel
from .data import load_splits
from .lrs_opt import Unroll, optimise_schedule
from .methods import MethodSpec, Protocol, Trainer, from_preset, log_uniform
from .models import build_model
from .report import markdown_table, write_csv, write_json
from .training import batch_schedule, evaluate, train_run

FAMILY_ORDER = ("LRS-OPT", "MARTHE", "HD", "RTHO", "Exponential", "Constant")


@dataclass
class E1Config:
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    n_train: int = 7000
    n_val: int = 700
    n_test: Optional[int] = None          # None: the whole official test set (or the rest of the pool)
    hidden: tuple = (500, 500, 500)
    batch_size: int = 100
    steps: int = 512                      # T
    eta0: float = 0.01
    lrs_iterations: int = 40              # LRS-OPT outer iterations (0: skip LRS-OPT)
    lrs_method: str = "gd"                # LRS-OPT outer descent: "gd" or "rms" (preconditioned)
    checkpoint_every: Optional[int] = None  # None: store every state while that fits in 4 GiB
    mus: tuple = (0.0, 0.9, 0.99, 0.999, 1.0)
    betas: tuple = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
    exp_samples: int = 8                  # gammas drawn log-uniformly in [0.9, 1]
    val_batch: Optional[int] = None       # hypergradient's validation examples per step (None: all)
    eval_every: int = 16
    hvp: str = "reverse"
    hypergrad: str = "grad"
    marthe_options: tuple = ()            # extra marthe_ext.Marthe keyword arguments (safeguards, ...)
    seed: int = 0


PRESETS = {
    # Minutes on 2 CPU cores: the bundled digits, a small MLP, a short horizon.
    "quick": dict(dataset="digits", n_train=1000, n_val=200, hidden=(64, 64), batch_size=50, steps=100,
                  lrs_iterations=6, mus=(0.0, 0.99, 1.0), betas=(1e-3,), exp_samples=2, eval_every=10),
    # The paper's sizes with fewer LRS-OPT iterations, a smaller grid and validation
    # mini-batches of 100 for the online hypergradient: about 25 minutes on 2 CPU cores.
    "medium": dict(lrs_iterations=12, mus=(0.0, 0.9, 0.99, 1.0), betas=(3e-5, 1e-4, 3e-4, 1e-3), exp_samples=4,
                   val_batch=100, eval_every=32),
    "full": {},
}


def e1_config(preset: str = "full", **overrides) -> E1Config:
    return from_preset(E1Config, PRESETS, preset, overrides, "E1")


def e1_methods(cfg: E1Config) -> list[MethodSpec]:
    """Every online configuration: Constant, Exponential samples, the (mu, beta) grid."""
    specs = [MethodSpec("Constant", {"lr": cfg.eta0})]
    gen = torch.Generator().manual_seed(cfg.seed + 1000)
    specs += [MethodSpec("Exponential", {"gamma": log_uniform(gen, 0.9, 1.0)}) for _ in range(cfg.exp_samples)]
    for mu in cfg.mus:
        for beta in cfg.betas:
            if mu == 0.0:
                specs.append(MethodSpec("HD", {"beta": beta}))
            elif mu == 1.0:
                specs.append(MethodSpec("RTHO", {"beta": beta}))
            else:
                specs.append(MethodSpec("MARTHE", {"mu": mu, "beta": beta}))
    return specs


def run_e1(cfg: E1Config, out: Path, progress: bool = True, device: str = "cpu") -> dict:
    """Every run, and (rank 0 only) the files in ``out``. Under torchrun each rank trains on
    its slice of every batch (``parallel``); LRS-OPT runs whole on every rank (see below)."""
    data = load_splits(cfg.dataset, cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.seed,
                       data_dir=cfg.data_dir).to(device)
    torch.manual_seed(cfg.seed)
    init = build_model("mlp", data.input_shape, data.num_classes, hidden=cfg.hidden).to(device).state_dict()
    batches = batch_schedule(len(data.x_train), cfg.batch_size, cfg.steps, seed=cfg.seed).to(device)
    if cfg.val_batch is None:
        def val_batch(t):
            return data.x_val, data.y_val
    else:
        val_idx = batch_schedule(len(data.x_val), cfg.val_batch, cfg.steps, seed=cfg.seed + 1).to(device)

        def val_batch(t):
            return data.x_val[val_idx[t]], data.y_val[val_idx[t]]

    protocol = Protocol("sgd", lr=cfg.eta0, hvp=cfg.hvp, hypergrad=cfg.hypergrad,
                        marthe_options=tuple(cfg.marthe_options))

    def fresh_model():
        model = build_model("mlp", data.input_shape, data.num_classes, hidden=cfg.hidden).to(device)
        model.load_state_dict(init)
        return model

    def run(spec: MethodSpec, extra: Optional[dict] = None) -> dict:
        model = fresh_model()
        trainer = Trainer(spec, parallel.wrap(model), protocol)  # DDP under torchrun
        started = time.perf_counter()
        log = train_run(trainer, data.x_train, data.y_train, batches, val_batch=val_batch,
                        evaluator=lambda: evaluate(model, data.x_val, data.y_val),
                        eval_every=cfg.eval_every, progress=progress, desc=spec.label)
        seconds = time.perf_counter() - started
        test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
        if log.diverged_at is not None:
            test_loss, test_acc = float("inf"), float("nan")
        parallel.check_agree(spec.label, [log.val_loss[-1], test_loss, trainer.lr])
        return dict(family=spec.family, label=spec.label,
                    hp={k: v for k, v in spec.hp.items() if k != "schedule"},
                    lrs=log.lrs, eval_steps=log.eval_steps, val_loss_curve=log.val_loss,
                    val_acc_curve=log.val_acc, val_loss=log.val_loss[-1], val_acc=log.val_acc[-1],
                    test_loss=test_loss, test_acc=test_acc, final_lr=trainer.lr, seconds=seconds,
                    diverged_at=log.diverged_at, skipped_steps=log.skipped_steps, **(extra or {}))

    runs, lrs_opt = [], None
    if cfg.lrs_iterations > 0:
        model = fresh_model()
        unroll = Unroll(model, [p.detach() for p in model.parameters()], data.x_train, data.y_train,
                        batches, data.x_val, data.y_val, checkpoint_every=cfg.checkpoint_every,
                        progress=progress)
        started = time.perf_counter()
        result = optimise_schedule(unroll, torch.full((cfg.steps,), cfg.eta0, dtype=torch.float64),
                                   cfg.lrs_iterations, method=cfg.lrs_method, progress=progress)
        # Under torchrun every rank optimises the schedule on the whole data (no collective
        # during a run that may outlast the process group's timeout); rank 0's schedule is
        # then everyone's, in case the device's kernels do not round alike on every rank.
        result.etas = parallel.broadcast_from_main(result.etas.to(device)).cpu()
        lrs_opt = dict(method=cfg.lrs_method, etas=result.etas, E_history=result.E_history, step_history=result.step_history,
                       iteration_seconds=result.seconds, forward_passes=result.forward_passes,
                       backward_passes=result.backward_passes, stopped=result.stopped,
                       checkpoint_every=unroll.k, stored_bytes=unroll.stored_bytes,
                       seconds=time.perf_counter() - started)
        runs.append(run(MethodSpec("LRS-OPT", {"schedule": result.etas}),
                        {"lrs_opt_seconds": lrs_opt["seconds"]}))
    specs = e1_methods(cfg)
    for spec in tqdm(specs, desc="E1 online methods", disable=not progress):
        runs.append(run(spec))

    best = best_per_family(runs)
    results = dict(config=asdict(cfg), device=device, data=dict(
        train=len(data.x_train), val=len(data.x_val), test=len(data.x_test), input_shape=data.input_shape),
        lrs_opt=lrs_opt, runs=runs, best={f: r["label"] for f, r in best.items()})
    if parallel.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_e1_outputs(results, best, out)
    return results


def best_per_family(runs: list[dict]) -> dict[str, dict]:
    """The run with the lowest final validation loss in each family (diverged runs last)."""
    best: dict[str, dict] = {}
    for r in runs:
        key = r["val_loss"] if r["diverged_at"] is None else float("inf")
        if r["family"] not in best or key < best[r["family"]]["_key"]:
            best[r["family"]] = dict(r, _key=key)
    ordered = {f: best[f] for f in FAMILY_ORDER if f in best}
    for r in ordered.values():
        r.pop("_key")
    return ordered


def e1_table(best: dict[str, dict], runs: list[dict]) -> str:
    counts = {f: sum(r["family"] == f for r in runs) for f in best}
    header = ["method", "best configuration", "configs", "val loss (E)", "val acc", "test loss", "test acc",
              "final LR", "seconds/run"]
    return markdown_table(header, [[f, r["label"], counts[f], r["val_loss"], r["val_acc"], r["test_loss"],
                                    r["test_acc"], r["final_lr"], round(r["seconds"], 1)]
                                   for f, r in best.items()])


def write_e1_outputs(results: dict, best: dict, out: Path) -> None:
    from .plots import plot_e1

    write_json(out / "e1_results.json", results)
    runs = results["runs"]
    write_csv(out / "e1_runs.csv",
              ["family", "label", "val_loss", "val_acc", "test_loss", "test_acc", "final_lr", "max_lr",
               "seconds", "diverged_at"],
              [[r["family"], r["label"], r["val_loss"], r["val_acc"], r["test_loss"], r["test_acc"],
                r["final_lr"], max(r["lrs"]), r["seconds"], r["diverged_at"]] for r in runs])
    families = list(best)
    steps = max(len(r["lrs"]) for r in best.values())
    write_csv(out / "e1_schedules.csv", ["step"] + families,
              [[t] + [best[f]["lrs"][t] if t < len(best[f]["lrs"]) else None for f in families]
               for t in range(steps)])
    (out / "e1_table.md").write_text(e1_table(best, runs))
    plot_e1(results, best, out / "e1.png")
