"""Probe of issue 15: does the default ``safeguards="robust"`` collapse / stall on digits, and why?

Digits MLP 64-256-256-10 (ReLU), plain SGD from eta0 = 0.01, batch 50, 480 steps, a
validation mini-batch of 50 (drawn, seeded, from the validation split) per step for the
hypergradient. Records eta, beta and h at every step through the public API only
(``opt.lr``, ``opt.hyper_lr``, ``opt.last_hypergrad``) and summarises each run.

    OMP_NUM_THREADS=1 python -m marthe_experiments.default_probe --methods default,constant \
        --out results/default_probe
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import marthe_ext
from .data import load_splits
from .models import build_model
from .training import batch_schedule, evaluate

BETAS = (1e-4, 1e-3, 1e-2, 1e-1)
SEEDS = (0, 1, 2)
STEPS, BATCH, ETA0, N_TRAIN, N_VAL, HIDDEN = 480, 50, 0.01, 1000, 300, (256, 256)
TREND_DECAY = 0.9  # the controller's trend average (controller.TREND_DECAY), recomputed from h
FREEZE_WINDOW, FREEZE_TOL = 200, 1e-4
CHANCE_LIKE = 1.0  # a final E above this (chance is ln 10 = 2.30) or non-finite is a collapse

# name -> extra Marthe keyword arguments (None: constant-LR torch.optim.SGD, lr in the name).
VARIANTS = {
    "default": {},
    "rprop0.9/1.1": {"hyper_lr_rprop": (0.9, 1.1)},
    "floor1e-3": {"hyper_lr_bounds": (1e-3, 0.1)},
}
CONSTANTS = (0.1, 0.3)


def run_one(method: str, beta: float, seed: int, data) -> dict:
    torch.manual_seed(seed)
    model = build_model("mlp", data.input_shape, data.num_classes, hidden=HIDDEN)
    batches = batch_schedule(N_TRAIN, BATCH, STEPS, seed=seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    val_idx = torch.randint(0, N_VAL, (STEPS, BATCH), generator=gen)
    if method.startswith("const"):
        opt = torch.optim.SGD(model.parameters(), lr=float(method[len("const"):]))
    else:
        # Marthe rejects a starting beta outside hyper_lr_bounds: a higher floor lifts it.
        start = max(beta, VARIANTS[method].get("hyper_lr_bounds", (0.0,))[0])
        opt = marthe_ext.Marthe(model.parameters(), lr=ETA0, dynamics="sgd", hyper_lr=start,
                                **VARIANTS[method])
    etas, betas, hs = [], [], []
    for t in range(STEPS):
        xb, yb = data.x_train[batches[t]], data.y_train[batches[t]]
        xv, yv = data.x_val[val_idx[t]], data.y_val[val_idx[t]]

        def closure():
            return F.cross_entropy(model(xb), yb)

        if isinstance(opt, marthe_ext.Marthe):
            etas.append(float(opt.lr))  # the LR this step uses
            opt.step(closure, lambda: F.cross_entropy(model(xv), yv))
            betas.append(float(opt.hyper_lr))
            hs.append(float(opt.last_hypergrad))
        else:
            etas.append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            closure().backward()
            opt.step()
    val_loss, val_acc = evaluate(model, data.x_val, data.y_val)
    return dict(method=method, beta=beta, seed=seed, E=val_loss, acc=val_acc,
                etas=etas, betas=betas, hs=hs)


def summarise(run: dict, floor: float) -> dict:
    etas, betas, hs = run["etas"], run["betas"], run["hs"]
    ref = etas[-FREEZE_WINDOW]
    frozen = max(abs(e / ref - 1) for e in etas[-FREEZE_WINDOW:]) < FREEZE_TOL
    out = dict(E=run["E"], max_lr=max(etas), final_lr=etas[-1], frozen=frozen)
    if not hs:
        return out
    trend, agree, disagree = 0.0, 0, 0
    agree_after = []  # agreement flags per step, to look at the late phase separately
    for h in hs:
        s = h * trend
        agree += s > 0
        disagree += s < 0
        agree_after.append(1 if s > 0 else (0 if s < 0 else None))
        trend = TREND_DECAY * trend + (1 - TREND_DECAY) * h
    at_floor = [i for i, b in enumerate(betas) if b <= floor * (1 + 1e-9)]
    first = at_floor[0] if at_floor else None
    recovered = first is not None and max(betas[first:]) > 10 * floor
    late = [a for a in agree_after[first:] if a is not None] if first is not None else []
    # last step at which eta moved by more than FREEZE_TOL relative to the previous step
    moves = [i for i in range(1, len(etas)) if abs(etas[i] / etas[i - 1] - 1) > FREEZE_TOL]
    out.update(p_agree=agree / max(1, agree + disagree), floor_step=first, recovered=recovered,
               p_agree_after_floor=(sum(late) / len(late)) if late else None,
               steps_at_floor=len(at_floor), last_move=moves[-1] if moves else None,
               final_beta=betas[-1])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="default,constant")
    ap.add_argument("--out", default="results/default_probe")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datas = {s: load_splits("digits", N_TRAIN, N_VAL, seed=s) for s in SEEDS}
    for method in args.methods.split(","):
        if method == "constant":
            jobs = [(f"const{lr}", 0.0, s) for lr in CONSTANTS for s in SEEDS]
        else:
            jobs = [(method, b, s) for b in BETAS for s in SEEDS]
        for m, b, s in jobs:
            t0 = time.perf_counter()
            run = run_one(m, b, s, datas[s])
            floor = VARIANTS.get(m, {}).get("hyper_lr_bounds", (1e-6, 0.1))[0]
            run["summary"] = summarise(run, floor)
            run["seconds"] = time.perf_counter() - t0
            name = f"{m.replace('/', '_')}_b{b:g}_s{s}.json"
            (out / name).write_text(json.dumps(run))
            sm = run["summary"]
            print(f"{m:14s} beta={b:<7g} seed={s} E={sm['E']:.4f} maxlr={sm['max_lr']:.3g} "
                  f"final_lr={sm['final_lr']:.3g} frozen={sm['frozen']} floor@{sm.get('floor_step')} "
                  f"p={sm.get('p_agree', float('nan')):.2f} {run['seconds']:.1f}s", flush=True)


if __name__ == "__main__":
    main()


def report(run_dir: Path) -> str:
    """The per-method table (markdown) from the run files in ``run_dir``."""
    runs = [json.loads(p.read_text()) for p in sorted(run_dir.glob("*.json"))]
    finite = [r["E"] for r in runs if math.isfinite(r["E"])]
    best = min(finite)
    order = ["default", *[m for m in VARIANTS if m != "default"], *[f"const{lr}" for lr in CONSTANTS]]
    lines = ["| method | E mean | E median | E min | E max | collapses | > 1.5x own best | frozen | max LR (max) | "
             "beta at floor (runs, median step) | recovered | p(agree) | p(agree) after floor | "
             "drift/step after floor | last LR move (median) |",
             "|" + "---|" * 15]
    for m in order:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        E = sorted(r["E"] if math.isfinite(r["E"]) else math.inf for r in rs)
        fin = [e for e in E if math.isfinite(e)]
        collapses = sum(1 for e in E if not math.isfinite(e) or e > CHANCE_LIKE)
        far = sum(1 for e in E if math.isfinite(e) and e <= CHANCE_LIKE and e > 1.5 * E[0])
        sm = [r["summary"] for r in rs]
        frozen = sum(s["frozen"] for s in sm)
        cell = lambda xs, f: f(xs) if xs else "-"
        fl = [s["floor_step"] for s in sm if s.get("floor_step") is not None]
        rec = sum(1 for s in sm if s.get("recovered"))
        pa = [s["p_agree"] for s in sm if "p_agree" in s]
        paf = [s["p_agree_after_floor"] for s in sm if s.get("p_agree_after_floor") is not None]
        grow, shrink = VARIANTS.get(m, {}).get("hyper_lr_rprop", (0.5, 1.2))[::-1]
        drift = [p * math.log(grow) + (1 - p) * math.log(shrink) for p in paf]
        moves = sorted(s["last_move"] for s in sm if s.get("last_move") is not None)
        med = lambda xs: xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])
        lines.append(
            f"| {m} | {sum(fin) / len(fin):.4f} (finite {len(fin)}/{len(E)}) | {med(E):.4f} | {E[0]:.4f} | "
            f"{E[-1]:.4f} | {collapses}/{len(rs)} | {far}/{len(rs)} | {frozen}/{len(rs)} | {max(s['max_lr'] for s in sm):.3g} | "
            f"{len(fl)}/{len(rs)}, {cell(sorted(fl), med)} | {rec if pa else '-'} | "
            f"{cell(pa, lambda x: f'{sum(x) / len(x):.2f}')} | {cell(paf, lambda x: f'{sum(x) / len(x):.2f}')} | "
            f"{cell(drift, lambda x: f'{sum(x) / len(x):+.3f}')} | {cell(moves, med)} |")
    lines.append(f"\nBest finite E over all runs: {best:.4f}. Collapse: E non-finite or > {CHANCE_LIKE} "
                 f"(chance = ln 10 = 2.30); '> 1.5x own best': finite, not a collapse, above 1.5x the best E "
                 f"of the same method's grid. Frozen: |eta_t / eta_(T-200) - 1| < 1e-4 over the last 200 steps.")
    return "\n".join(lines)


def per_run(run_dir: Path) -> str:
    rows = ["| method | beta | seed | E | max LR | final LR | frozen | floor step | last LR move | p(agree) | final beta |",
            "|" + "---|" * 11]
    for p in sorted(run_dir.glob("*.json")):
        r = json.loads(p.read_text())
        s = r["summary"]
        rows.append(f"| {r['method']} | {r['beta']:g} | {r['seed']} | {r['E']:.4f} | {s['max_lr']:.3g} | "
                    f"{s['final_lr']:.3g} | {s['frozen']} | {s.get('floor_step')} | {s.get('last_move')} | "
                    f"{s.get('p_agree', float('nan')):.2f} | {s.get('final_beta', float('nan')):.2g} |")
    return "\n".join(rows)
