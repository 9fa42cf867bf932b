"""E2: the paper's CNN protocol (Donini et al. 2020, section 5.2) on the data available here.

The paper trains VGG-11 and ResNet-18 on CIFAR-10/100 with SGDM (eta0 = 0.1, momentum
0.9) and Adam (eta0 = 0.003), batch 128, weight decay 5e-4, gradients clipped to +-100;
beta ~ logU[1e-6, 1e-3] for the hypergradient methods, mu in [0.9, 0.999] for MARTHE,
gamma ~ logU[0.9, 1] for Exponential (decay per epoch). Here: CIFAR-style VGG/ResNet of
reduced width on Fashion-MNIST (or CIFAR-10 from a local copy), compared with two
learning-rate-free optimisers users pick instead: schedule-free SGD/AdamW and Prodigy.

Per (model, protocol, method): ``configs`` random hyperparameter samples are trained with
the first seed and the one with the best final validation accuracy is rerun with the
other seeds (the data split stays fixed; initial weights and batch order change).
Reported: test accuracy mean and standard deviation over seeds, LR curves, seconds of
training per epoch. MARTHE's mu is drawn as 1 - mu ~ logU[1e-3, 1e-1] (mu in [0.9, 0.999]).
"""
from __future__ import annotations

import statistics
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import parallel
from .data import load_splits
from .methods import MethodSpec, Protocol, Trainer, availability, from_preset, log_uniform
from .models import build_model
from .report import downsample, markdown_table, write_csv, write_json
from .training import BN_REFRESH_BATCHES, batch_schedule, evaluate, recalibrate_bn, train_run

PROTOCOLS = {
    "sgdm": dict(dynamics="sgdm", lr=0.1, momentum=0.9),
    "adam": dict(dynamics="adam", lr=0.003),
}
# "SF" is schedule-free SGD under the SGDM protocol and schedule-free AdamW under Adam.
E2_METHODS = ("Exponential", "HD", "RTHO", "MARTHE", "SF", "Prodigy")
_SEARCHED = ("Exponential", "HD", "RTHO", "MARTHE")


@dataclass
class E2Config:
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    n_train: Optional[int] = None          # None: the whole training pool less validation
    n_val: int = 5000
    n_test: Optional[int] = None
    models: tuple = ("vgg", "resnet")
    protocols: tuple = ("sgdm", "adam")
    methods: tuple = E2_METHODS
    width: int = 16                        # channels of the first block (64 in VGG-11/ResNet-18)
    resnet_blocks: tuple = (2, 2, 2, 2)
    epochs: int = 20
    batch_size: int = 128
    val_batch: int = 128                   # validation examples per hypergradient
    weight_decay: float = 5e-4
    grad_clip: float = 100.0
    configs: int = 4                       # random-search samples per searched method
    seeds: int = 3
    hvp: str = "reverse"
    hypergrad: str = "grad"
    marthe_options: tuple = ()             # extra marthe_ext.Marthe keyword arguments (safeguards, ...)
    seed: int = 0


PRESETS = {
    # Minutes on 2 CPU cores: a small subset, narrow models, 2 epochs, one configuration.
    "quick": dict(n_train=1024, n_val=256, n_test=500, width=8, resnet_blocks=(1, 1, 1), epochs=2,
                  configs=1, seeds=2, val_batch=64),
    # Hours on a CPU; minutes per run on a GPU (--device cuda).
    "full": {},
}


def e2_config(preset: str = "full", **overrides) -> E2Config:
    cfg = from_preset(E2Config, PRESETS, preset, overrides, "E2")
    bad = [m for m in cfg.methods if m not in E2_METHODS] + [p for p in cfg.protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"unknown E2 methods/protocols {bad}; methods: {E2_METHODS}, protocols: {tuple(PROTOCOLS)}")
    return cfg


def family_of(method: str, protocol: str) -> str:
    if method == "SF":
        return "SF-SGD" if protocol == "sgdm" else "SF-AdamW"
    return method


def sample_configs(method: str, protocol: str, model: str, cfg: E2Config) -> list[dict]:
    """The random-search hyperparameters of one (model, protocol, method), seeded and stable."""
    family = family_of(method, protocol)
    if method not in _SEARCHED:
        return [{}]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(f"{model}/{protocol}/{family}".encode()))
    out = []
    for _ in range(cfg.configs):
        if method == "Exponential":
            out.append({"gamma": log_uniform(gen, 0.9, 1.0)})
        elif method == "MARTHE":
            out.append({"beta": log_uniform(gen, 1e-6, 1e-3), "mu": 1.0 - log_uniform(gen, 1e-3, 1e-1)})
        else:
            out.append({"beta": log_uniform(gen, 1e-6, 1e-3)})
    return out


def run_e2(cfg: E2Config, out: Path, progress: bool = True, device: str = "cpu") -> dict:
    """Every run, and (rank 0 only) the files in ``out``. Under torchrun each rank trains on
    its slice of every batch (``parallel``)."""
    data = load_splits(cfg.dataset, cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.seed,
                       data_dir=cfg.data_dir).to(device)
    n = len(data.x_train)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} exceeds the {n} training examples")
    steps = steps_per_epoch * cfg.epochs

    def run(model_name: str, protocol_name: str, spec: MethodSpec, seed: int) -> dict:
        torch.manual_seed(seed)
        model = build_model(model_name, data.input_shape, data.num_classes, width=cfg.width,
                            blocks=cfg.resnet_blocks).to(device)
        protocol = Protocol(**PROTOCOLS[protocol_name], weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                            hvp=cfg.hvp, hypergrad=cfg.hypergrad, marthe_options=tuple(cfg.marthe_options))
        trainer = Trainer(spec, parallel.wrap(model), protocol, decay_per="epoch")  # DDP under torchrun
        batches = batch_schedule(n, cfg.batch_size, steps, seed=seed).to(device)
        val_idx = batch_schedule(len(data.x_val), min(cfg.val_batch, len(data.x_val)), steps,
                                 seed=seed + 1).to(device)
        log = train_run(trainer, data.x_train, data.y_train, batches,
                        val_batch=lambda t: (data.x_val[val_idx[t]], data.y_val[val_idx[t]]),
                        evaluator=lambda: evaluate(model, data.x_val, data.y_val, batch_size=500),
                        eval_every=steps_per_epoch, steps_per_epoch=steps_per_epoch, progress=progress,
                        desc=f"{model_name}/{protocol_name}/{spec.label}/seed {seed}")
        if log.diverged_at is None:
            with trainer.evaluation(recalibrate=lambda: recalibrate_bn(model, data.x_train, batches[:BN_REFRESH_BATCHES])):
                test_loss, test_acc = evaluate(model, data.x_test, data.y_test, batch_size=500)
        else:
            test_loss, test_acc = float("inf"), float("nan")
        parallel.check_agree(f"{model_name}/{protocol_name}/{spec.label}/seed {seed}",
                             [log.val_loss[-1], test_loss, test_acc, log.lrs[-1]])
        idx, lrs = downsample(log.lrs, 512)
        return dict(model=model_name, protocol=protocol_name, family=spec.family, label=spec.label,
                    hp=dict(spec.hp), seed=seed, lr_steps=idx, lrs=lrs, eval_steps=log.eval_steps,
                    val_loss_curve=log.val_loss, val_acc_curve=log.val_acc, val_loss=log.val_loss[-1],
                    val_acc=log.val_acc[-1], test_loss=test_loss, test_acc=test_acc,
                    epoch_seconds=log.epoch_times, diverged_at=log.diverged_at,
                    skipped_steps=log.skipped_steps)

    runs, skipped, summary, curves = [], [], [], {}
    cache: dict[tuple, dict] = {}
    plan = [(m, p, meth) for m in cfg.models for p in cfg.protocols for meth in cfg.methods]
    for model_name, protocol_name, method in tqdm(plan, desc="E2", disable=not progress):
        family = family_of(method, protocol_name)
        why_not = availability(family)
        if why_not:
            skipped.append(dict(model=model_name, protocol=protocol_name, family=family, reason=why_not))
            summary.append(dict(model=model_name, protocol=protocol_name, family=family, label=family,
                                status=why_not, seeds=0, test_acc_mean=None, test_acc_std=None,
                                val_acc_mean=None, sec_per_epoch=None, diverged=0, skipped_steps=0))
            continue

        def cached(spec: MethodSpec, seed: int) -> dict:
            # Prodigy ignores the protocol's eta0 and dynamics: one run serves both protocols.
            key = (model_name, "-" if family == "Prodigy" else protocol_name, spec.label, seed)
            if key not in cache:
                cache[key] = run(model_name, protocol_name, spec, seed)
                runs.append(cache[key])
            return dict(cache[key], protocol=protocol_name)

        search = [cached(MethodSpec(family, hp), cfg.seed) for hp in sample_configs(method, protocol_name, model_name, cfg)]
        best = max(search, key=lambda r: (r["diverged_at"] is None, r["val_acc"]))
        spec = MethodSpec(family, best["hp"])
        finals = [best] + [cached(spec, cfg.seed + s) for s in range(1, cfg.seeds)]
        summary.append(summarise(model_name, protocol_name, family, spec.label, finals, len(search)))
        curves[(model_name, protocol_name, family)] = best["lrs"]

    results = dict(config=asdict(cfg), device=device, steps_per_epoch=steps_per_epoch,
                   data=dict(train=n, val=len(data.x_val), test=len(data.x_test), input_shape=data.input_shape),
                   summary=summary, skipped=skipped, runs=runs)
    if parallel.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_e2_outputs(results, curves, out)
    return results


def summarise(model: str, protocol: str, family: str, label: str, finals: list[dict], searched: int) -> dict:
    ok = [r for r in finals if r["diverged_at"] is None]
    accs = [r["test_acc"] for r in ok]
    secs = [s for r in finals for s in r["epoch_seconds"]]
    return dict(model=model, protocol=protocol, family=family, label=label, status="ok",
                seeds=len(finals), configs_searched=searched, diverged=len(finals) - len(ok),
                skipped_steps=sum(r["skipped_steps"] for r in finals),
                test_acc_mean=statistics.fmean(accs) if accs else None,
                test_acc_std=statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None),
                val_acc_mean=statistics.fmean(r["val_acc"] for r in ok) if ok else None,
                final_lr_mean=statistics.fmean(r["lrs"][-1] for r in finals),
                sec_per_epoch=statistics.fmean(secs) if secs else None)


def e2_table(summary: list[dict]) -> str:
    header = ["model", "protocol", "method", "chosen configuration", "test acc mean", "test acc std",
              "seeds (diverged)", "skipped steps", "final LR", "s/epoch"]
    rows = []
    for s in summary:
        if s["status"] != "ok":
            rows.append([s["model"], s["protocol"], s["family"], s["status"], None, None, 0, None, None, None])
            continue
        rows.append([s["model"], s["protocol"], s["family"], s["label"], s["test_acc_mean"], s["test_acc_std"],
                     f"{s['seeds']} ({s['diverged']})", s["skipped_steps"], s["final_lr_mean"],
                     None if s["sec_per_epoch"] is None else round(s["sec_per_epoch"], 2)])
    return markdown_table(header, rows)


def write_e2_outputs(results: dict, curves: dict, out: Path) -> None:
    from .plots import plot_e2

    write_json(out / "e2_results.json", results)
    summary = results["summary"]
    keys = ["model", "protocol", "family", "label", "status", "seeds", "diverged", "skipped_steps", "test_acc_mean",
            "test_acc_std", "val_acc_mean", "sec_per_epoch"]
    write_csv(out / "e2_summary.csv", keys, [[s.get(k) for k in keys] for s in summary])
    (out / "e2_table.md").write_text(e2_table(summary))
    plot_e2(summary, curves, out / "e2.png")
