"""Robust MARTHE: the E1 (mu, beta) grid for the faithful algorithm and each safeguard.

Setup (E1's, Donini et al. 2020 section 5.1): an MLP trained by plain SGD for T steps
from eta0 on fixed mini-batches; MARTHE in validation mode (the hypergradient uses the
validation loss after each step); E = full validation loss after T steps. For every
variant (the faithful algorithm of SPEC section 2, and ``marthe_ext.Marthe`` with one or
more of its safeguards on) the grid mu x beta x seeds is run and summarised:

* diverged runs: E non-finite, or any step skipped (``opt.skipped_steps > 0``: a
  non-finite loss, gradient, HVP or hypergradient), or E above the initial validation
  loss E_0 (about ln 10: training made the model worse than its random start);
* best E: the lowest mean-over-seeds E among the grid cells where no seed diverged;
* median E over the beta grid: for each beta the best cell (over mu), then the median
  over beta: how much the result depends on guessing beta.

Outputs in ``--out``: ``safeguard_runs.jsonl`` (one line per run, written as runs end, so
an interrupted study resumes where it stopped), ``safeguard_runs.csv``,
``safeguard_results.json`` (config, runs, summary), ``safeguard_table.md`` and
``safeguard_heatmap.png`` (one panel per variant: mean E over seeds per (mu, beta) cell,
diverged cells hatched with their number of diverged seeds).

Run: ``python -m marthe_experiments.safeguard_study --out DIR [--quick] [--seeds N]
[--variants faithful,lr-change,...] [--workers W --threads K]``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import load_splits
from .models import build_model
from .report import markdown_table, read_run_log, write_csv, write_json
from .training import batch_schedule, evaluate

# Each variant is a set of Marthe options; all off is the faithful algorithm (SPEC section 2).
VARIANTS: dict[str, dict] = {
    "faithful": {},
    # (a) eta_{t+1} in [eta_t / rho, rho eta_t]. rho = 1.1 admits the fastest decay of E1's
    # exponential family (gamma = 0.9 per step, 1/0.9 = 1.11) and caps the growth at 10 %
    # per step, so reaching the edge of stability from eta0 takes tens of steps and the
    # validation hypergradient has time to turn the LR around.
    "lr-change": {"max_lr_change": 1.1},
    # (b) h divided by its running RMS (decay 0.99, about the last 100 steps), step in log
    # eta: beta becomes a relative step, |log(eta_{t+1}/eta_t)| <= 10 beta, eta > 0.
    "rms-log": {"hypergrad_norm": "rms-log", "hypergrad_norm_decay": 0.99},
    # (b') the same normalisation with an absolute step: eta <- max(eta - beta h/rms(h), 0).
    "rms": {"hypergrad_norm": "rms", "hypergrad_norm_decay": 0.99},
    # (c) ||Zw|| <= kappa ||w||. Zw = d w / d eta, so eta ||Zw|| / ||w|| is the relative
    # first-order change of the weights per relative change of eta: kappa = 1 / eta0 = 100
    # lets a doubling of eta0 move the weights by at most their own norm.
    "tangent-cap": {"max_tangent_ratio": 100.0},
    # (a) + (b): the relative step of rms-log with its worst case capped at 10 % per step.
    "rms-log+lr-change": {"hypergrad_norm": "rms-log", "hypergrad_norm_decay": 0.99, "max_lr_change": 1.1},
    # (a') + (b): rms-log's hard braking kept, only its growth capped at 10 % per step
    # (rms-log's one divergence was a climb to eta = 47).
    "rms-log+growth": {"hypergrad_norm": "rms-log", "hypergrad_norm_decay": 0.99, "max_lr_growth": 1.1},
    # (b) + (a') + (d) = Marthe's default, safeguards="robust" (spelled out: the recorded runs
    # stay tied to these options if the preset changes): beta itself adapts, x1.2 while h
    # agrees with its trend, x0.5 when not (Rprop's factors), within [1e-6, 0.1]: the user's
    # beta is only the first meta step. The cap 0.1 ~ log(1.1) keeps a typical (unit)
    # normalised step within the growth cap's 10 %.
    "rms-log+growth+rprop": {"hypergrad_norm": "rms-log", "hypergrad_norm_decay": 0.99, "max_lr_growth": 1.1,
                             "hyper_lr_rprop": (0.5, 1.2), "hyper_lr_bounds": (1e-6, 0.1)},
}
# Issue 15's default (safeguards="robust" since 2026-12-01, spelled out): the above plus (e),
# the loss trust region (a climbing training loss caps the LR at the LR of the best loss);
# and the candidate that also balanced (d) at a sign agreement of 61 % instead of 79 %.
VARIANTS["robust-2"] = dict(VARIANTS["rms-log+growth+rprop"], loss_trust=0.5)
VARIANTS["robust-2+rprop0.75"] = dict(VARIANTS["robust-2"], hyper_lr_rprop=(0.75, 1.2))
# (f): decreases of the LR get their own meta step, which also grows while the 20-step mean of
# the normalised h asks for a smaller LR with a z-score above 2 (issue 15's answer to the
# BatchNorm CNN's stall; the default since 2026-12-01).
VARIANTS["robust-2+trend2"] = dict(VARIANTS["robust-2"], decay_trend=2.0)
# (f) with the looser test z = 1, the option for a BatchNorm CNN under Adam: its cost on E1
VARIANTS["robust-2+trend1"] = dict(VARIANTS["robust-2"], decay_trend=1.0)
# (f) on the mean of sign(h) (decay_trend_test="sign", issue 15's late-freeze finding): its cost
# on E1, HD above all, before it can be the default
VARIANTS["robust-2+trend2sign"] = dict(VARIANTS["robust-2+trend2"], decay_trend_test="sign")
# The first version of (d), run first: with a cap of 1 single spikes cut eta 20-80x at once
# and it took hundreds of steps to climb back.
VARIANTS["rprop-beta-max-1"] = dict(VARIANTS["rms-log+growth+rprop"], hyper_lr_bounds=(1e-6, 1.0))
DEFAULT_VARIANTS = ("faithful", "lr-change", "rms-log", "tangent-cap", "rms-log+lr-change")

TARGET_BEST_E = 0.458      # the authors' best E on this setup (issue 8)
TARGET_MEDIAN_RATIO = 1.10  # median over the beta grid within 10 % of the best E


@dataclass
class StudyConfig:
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    n_train: int = 7000
    n_val: int = 700
    hidden: tuple = (500, 500, 500)
    batch_size: int = 100
    steps: int = 512                       # T
    eta0: float = 0.01
    mus: tuple = (0.0, 0.9, 0.99, 0.999, 1.0)
    betas: tuple = (1e-4, 1e-3, 1e-2, 1e-1)
    seeds: tuple = (0, 1, 2)
    variants: tuple = DEFAULT_VARIANTS
    val_batch: Optional[int] = 100         # validation examples per hypergradient (None: all)
    grad_clip: Optional[float] = None      # E1's protocol: no clipping
    lr_stride: int = 8                     # keep eta every lr_stride steps in the records


QUICK = dict(dataset="digits", n_train=1000, n_val=200, hidden=(16, 16), batch_size=50, steps=30,
             mus=(0.0, 0.99, 1.0), betas=(1e-3, 1e-1), seeds=(0,), val_batch=50)


def run_key(variant: str, mu: float, beta: float, seed: int) -> str:
    return f"{variant}|{mu:g}|{beta:g}|{seed}"


def same_run_as(variant: str, beta: float) -> Optional[str]:
    """The variant whose run is bit-identical to this one at this beta, if any.

    rms-log bounds every log-step by beta / sqrt(1 - d); when that is below log(rho) the
    LR-change clamp of "rms-log+lr-change" never binds, so the trajectory is rms-log's
    exactly (same operations, the clamp returns its input): the run is reused, not redone.
    """
    opts = VARIANTS[variant]
    rho, decay = opts.get("max_lr_change"), opts.get("hypergrad_norm_decay", 0.99)
    if opts.get("hypergrad_norm") != "rms-log" or rho is None or opts.get("max_tangent_ratio") is not None:
        return None
    if beta / math.sqrt(1 - decay) >= math.log(rho):
        return None
    for name, other in VARIANTS.items():
        if other == {k: v for k, v in opts.items() if k != "max_lr_change"}:
            return name
    return None


# ----------------------------------------------------------------------------- one run
_PROBLEMS: dict = {}


def _problem(cfg: StudyConfig, seed: int) -> dict:
    """Data split, initial weights, training and validation batches of one seed (as E1)."""
    key = (seed, cfg.dataset, cfg.n_train, cfg.n_val, cfg.hidden, cfg.batch_size, cfg.steps, cfg.val_batch)
    if key not in _PROBLEMS:
        data = load_splits(cfg.dataset, cfg.n_train, cfg.n_val, n_test=1, seed=seed, data_dir=cfg.data_dir)
        torch.manual_seed(seed)
        init = build_model("mlp", data.input_shape, data.num_classes, hidden=cfg.hidden).state_dict()
        batches = batch_schedule(len(data.x_train), cfg.batch_size, cfg.steps, seed=seed)
        val_idx = (None if cfg.val_batch is None
                   else batch_schedule(len(data.x_val), cfg.val_batch, cfg.steps, seed=seed + 1))
        model = build_model("mlp", data.input_shape, data.num_classes, hidden=cfg.hidden)
        model.load_state_dict(init)
        model.eval()
        e0, _ = evaluate(model, data.x_val, data.y_val)
        _PROBLEMS.clear()  # one seed at a time per process: the jobs are ordered by seed
        _PROBLEMS[key] = dict(data=data, init=init, batches=batches, val_idx=val_idx, e0=e0)
    return _PROBLEMS[key]


def run_one(cfg: StudyConfig, variant: str, mu: float, beta: float, seed: int, threads: int = 1) -> dict:
    """T steps of MARTHE with the variant's safeguards; E and the divergence verdict."""
    import marthe_ext

    torch.set_num_threads(threads)
    prob = _problem(cfg, seed)
    data = prob["data"]
    model = build_model("mlp", data.input_shape, data.num_classes, hidden=cfg.hidden)
    model.load_state_dict(prob["init"])
    model.train()
    opt = marthe_ext.Marthe(list(model.parameters()), lr=cfg.eta0, dynamics="sgd", mu=mu, hyper_lr=beta,
                            grad_clip=cfg.grad_clip, hvp="reverse", hypergrad="grad", backend="torch",
                            model=model, **{"safeguards": None, **VARIANTS[variant]})
    params = list(model.parameters())
    lrs, reason, stopped_at = [cfg.eta0], None, None
    # How close the run came to triggering (a) and (c): lets a faithful run stand for them.
    max_log_step, max_ratio, eta_prev = 0.0, 0.0, cfg.eta0
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skipped steps are counted, not warned
        for t in range(cfg.steps):
            idx = prob["batches"][t]
            xb, yb = data.x_train[idx], data.y_train[idx]
            if prob["val_idx"] is None:
                xv, yv = data.x_val, data.y_val
            else:
                xv, yv = data.x_val[prob["val_idx"][t]], data.y_val[prob["val_idx"][t]]
            loss = opt.step(lambda: F.cross_entropy(model(xb), yb),
                            val_closure=lambda: F.cross_entropy(model(xv), yv))
            eta = opt.lr
            step_size = abs(math.log(eta / eta_prev)) if eta > 0 and eta_prev > 0 else (
                0.0 if eta == eta_prev else math.inf)
            max_log_step, eta_prev = max(max_log_step, step_size), eta
            zw = [opt.state[p]["tangent"] for p in params if "tangent" in opt.state[p]]
            if zw:
                with torch.no_grad():
                    max_ratio = max(max_ratio, float(_norm(zw) / _norm(params)))
            if (t + 1) % cfg.lr_stride == 0 or t + 1 == cfg.steps:
                lrs.append(eta)
            # A skipped step or a non-finite loss already makes the run diverged: stop there.
            if opt.skipped_steps > 0:
                reason, stopped_at = "skipped step", t
                break
            if not math.isfinite(float(loss)):
                reason, stopped_at = "non-finite training loss", t
                break
        seconds = time.perf_counter() - started
        model.eval()
        e, acc = evaluate(model, data.x_val, data.y_val)
    if reason is None and not math.isfinite(e):
        reason = "non-finite E"
    elif reason is None and e > prob["e0"]:
        reason = "E above the initial loss"
    return dict(key=run_key(variant, mu, beta, seed), variant=variant, mu=mu, beta=beta, seed=seed,
                E=e, val_acc=acc, E0=prob["e0"], diverged=reason is not None, reason=reason,
                stopped_at=stopped_at, skipped_steps=opt.skipped_steps, final_lr=opt.lr,
                max_lr=max(lrs), min_lr=min(lrs), max_log_lr_step=max_log_step,
                max_tangent_norm_ratio=max_ratio, lrs=lrs, seconds=seconds)


def _job(args) -> dict:
    cfg, variant, mu, beta, seed, threads = args
    return run_one(cfg, variant, mu, beta, seed, threads)


def _norm(tensors) -> Tensor:
    """The global 2-norm exactly as ``safeguards.cap_tangents_`` computes it."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors))).double())


# ----------------------------------------------------------------------------- the grid
def reused_from_faithful(variant: str, faithful: Optional[dict]) -> bool:
    """True when the faithful run proves this variant's run identical to it, bit for bit.

    (a) and (c) act only when triggered: the LR clamp when a step would change eta by more
    than a factor rho, the cap when ||Zw|| > kappa ||w||. If the faithful run never went
    there (its largest |log(eta_{t+1}/eta_t)| is below log rho, its largest ||Zw||/||w||
    below kappa), the clamp returns its input and the cap multiplies by exactly 1.0 at every
    step: the variant's trajectory is the faithful one and the run is reused, not redone.
    """
    opts = VARIANTS[variant]
    if not opts or faithful is None or set(opts) - {"max_lr_change", "max_tangent_ratio"}:
        return False
    def seen(name: str) -> float:  # absent (older record) or null (infinite): no proof
        value = faithful.get(name)
        return math.inf if value is None else value

    if "max_lr_change" in opts and not seen("max_log_lr_step") < math.log(opts["max_lr_change"]):
        return False
    if "max_tangent_ratio" in opts and not seen("max_tangent_norm_ratio") < opts["max_tangent_ratio"] * (1 - 1e-9):
        return False
    return True


def _depends_on_faithful(cfg: StudyConfig, variant: str) -> bool:
    opts = VARIANTS[variant]
    return "faithful" in cfg.variants and bool(opts) and not set(opts) - {"max_lr_change", "max_tangent_ratio"}


def run_grid(cfg: StudyConfig, out: Path, workers: int = 1, threads: int = 1, progress: bool = True) -> list[dict]:
    """Every (variant, mu, beta, seed) not yet in ``out/safeguard_runs.jsonl``; returns all runs.

    Seed by seed (a study stopped early holds whole grids of its first seeds): first every
    run that needs no evidence, then the runs of (a)/(c) that the faithful run of the same
    cell does not prove identical to itself (``reused_from_faithful``).
    """
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "safeguard_runs.jsonl"
    done = read_run_log(log_path)
    cells = [(v, mu, beta, s) for s in cfg.seeds for v in cfg.variants for mu in cfg.mus for beta in cfg.betas]
    aliases: dict[str, str] = {}
    started = time.perf_counter()
    pool = None
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))

    def record(r: dict, log) -> None:
        done[r["key"]] = r
        log.write(json.dumps(_strict(r)) + "\n")
        log.flush()
        if progress:
            verdict = f"DIVERGED ({r['reason']})" if r["diverged"] else ""
            print(f"[{time.perf_counter() - started:7.0f}s] {len(done)} runs | {r['key']}: E={r['E']:.4f} "
                  f"{verdict} {r['seconds']:.1f}s", flush=True)

    def run_all(jobs: list, log) -> None:
        jobs = [j for j in dict.fromkeys(jobs) if run_key(*j) not in done]
        if pool is None:
            for j in jobs:
                record(_job((cfg, *j, threads)), log)
            return
        from concurrent.futures import as_completed

        for fut in as_completed([pool.submit(_job, (cfg, *j, threads)) for j in jobs]):
            record(fut.result(), log)

    try:
        with open(log_path, "a") as log:
            for seed in cfg.seeds:
                mine = [c for c in cells if c[3] == seed]
                first, later = [], []
                for v, mu, beta, s in mine:
                    twin = same_run_as(v, beta)
                    if twin is not None:
                        aliases[run_key(v, mu, beta, s)] = run_key(twin, mu, beta, s)
                        first.append((twin, mu, beta, s))
                    elif _depends_on_faithful(cfg, v):
                        later.append((v, mu, beta, s))
                    else:
                        first.append((v, mu, beta, s))
                run_all(first, log)
                rest = []
                for v, mu, beta, s in later:
                    f_key = run_key("faithful", mu, beta, s)
                    if reused_from_faithful(v, done.get(f_key)):
                        aliases[run_key(v, mu, beta, s)] = f_key
                    else:
                        rest.append((v, mu, beta, s))
                run_all(rest, log)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    runs = []
    for v, mu, beta, s in cells:
        k = run_key(v, mu, beta, s)
        r = done.get(k) or dict(done[aliases[k]], key=k, variant=v, reused_from=aliases[k].split("|")[0])
        runs.append(_loose(r))
    return runs


def _strict(r: dict) -> dict:
    """JSON lines hold no NaN/inf: non-finite E is stored as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}


def _loose(r: dict) -> dict:
    return dict(r, E=math.inf if r["E"] is None else r["E"])


# ----------------------------------------------------------------------------- summary
def cell_stats(runs: Sequence[dict]) -> dict:
    """(variant, mu, beta) -> mean and std of E over seeds, and the number of diverged seeds."""
    cells: dict = {}
    for r in runs:
        cells.setdefault((r["variant"], r["mu"], r["beta"]), []).append(r)
    stats = {}
    for key, rs in cells.items():
        es = [r["E"] for r in rs]
        finite = [e for e in es if math.isfinite(e)]
        stats[key] = dict(n=len(rs), diverged=sum(r["diverged"] for r in rs),
                          mean=statistics.fmean(finite) if finite else math.inf,
                          std=statistics.pstdev(finite) if len(finite) > 1 else 0.0)
    return stats


def summarise(cfg: StudyConfig, runs: Sequence[dict]) -> list[dict]:
    """Per variant: diverged runs, best E and where, median over beta of the per-beta best."""
    stats = cell_stats(runs)
    rows = []
    for v in cfg.variants:
        cells = {(mu, beta): s for (vv, mu, beta), s in stats.items() if vv == v}
        if not cells:
            continue
        clean = {k: s for k, s in cells.items() if s["diverged"] == 0}
        best_key = min(clean, key=lambda k: clean[k]["mean"]) if clean else None
        best = clean[best_key]["mean"] if best_key else math.inf
        per_beta = []
        for beta in cfg.betas:
            ok = [s["mean"] for (mu, b), s in clean.items() if b == beta]
            per_beta.append(min(ok) if ok else math.inf)
        median = statistics.median(per_beta)
        diverged = sum(s["diverged"] for s in cells.values())
        total = sum(s["n"] for s in cells.values())
        ratio = median / best if math.isfinite(best) else math.inf
        rows.append(dict(
            variant=v, options=VARIANTS[v], diverged=diverged, runs=total, best_E=best,
            best_E_std=clean[best_key]["std"] if best_key else math.nan,
            best_at=dict(mu=best_key[0], beta=best_key[1]) if best_key else None,
            per_beta_best=dict(zip(map(float, cfg.betas), per_beta)), median_E=median, median_ratio=ratio,
            target=dict(no_divergence=diverged == 0, best=best <= TARGET_BEST_E,
                        beta_insensitive=ratio <= TARGET_MEDIAN_RATIO)))
    return rows


def summary_table(rows: Sequence[dict]) -> str:
    header = ["variant", "options", "diverged runs", "best E (mean ± std over seeds)", "best at (mu, beta)",
              "median over beta of per-beta best E", "median / best", "target met"]

    def opts(o: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in o.items()) or "(none: SPEC §2)"

    out = []
    for r in rows:
        t = r["target"]
        met = "yes" if all(t.values()) else "no (" + ", ".join(
            name for name, ok in (("divergence", t["no_divergence"]), (f"best > {TARGET_BEST_E}", t["best"]),
                                  ("beta-sensitive", t["beta_insensitive"])) if not ok) + ")"
        best = "-" if not math.isfinite(r["best_E"]) else f"{r['best_E']:.3f} ± {r['best_E_std']:.3f}"
        at = "-" if r["best_at"] is None else f"({r['best_at']['mu']:g}, {r['best_at']['beta']:g})"
        out.append([r["variant"], opts(r["options"]), f"{r['diverged']} / {r['runs']}", best, at,
                    r["median_E"], r["median_ratio"], met])
    return markdown_table(header, out)


def cell_table(cfg: StudyConfig, runs: Sequence[dict]) -> str:
    """Per variant, the mu x beta grid of mean E over seeds ("k/n div" where k of n seeds diverged)."""
    stats = cell_stats(runs)
    parts = []
    for v in cfg.variants:
        rows = []
        for mu in cfg.mus:
            row = [f"{mu:g}"]
            for beta in cfg.betas:
                st = stats.get((v, mu, beta))
                if st is None:
                    row.append("-")
                elif st["diverged"]:
                    row.append(f"{st['diverged']}/{st['n']} div")
                else:
                    row.append(f"{st['mean']:.3f}")
            rows.append(row)
        parts.append(f"**{v}** (mean E over seeds)\n\n"
                     + markdown_table(["mu \\ beta"] + [f"{b:g}" for b in cfg.betas], rows))
    return "\n".join(parts)


def plot_heatmap(cfg: StudyConfig, runs: Sequence[dict], path: Path) -> None:
    """One panel per variant: mean E per (mu, beta); diverged cells hatched, annotated ×k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stats = cell_stats(runs)
    variants = [v for v in cfg.variants if any(k[0] == v for k in stats)]
    finite = [s["mean"] for s in stats.values() if math.isfinite(s["mean"]) and s["diverged"] == 0]
    lo = min(finite) if finite else 0.0
    hi = max(lo + 1e-6, min(max(finite) if finite else 1.0, 2 * lo + 0.2))
    fig, axes = plt.subplots(1, len(variants), figsize=(2.3 * len(variants) + 0.6, 2.6), squeeze=False)
    image = None
    for ax, v in zip(axes[0], variants):
        grid = np.full((len(cfg.mus), len(cfg.betas)), np.nan)
        for i, mu in enumerate(cfg.mus):
            for j, beta in enumerate(cfg.betas):
                s = stats.get((v, mu, beta))
                if s is None:
                    continue
                if s["diverged"] == 0:
                    grid[i, j] = s["mean"]
                    dark = s["mean"] > lo + 0.5 * (hi - lo)  # the dark end of viridis_r
                    ax.text(j, i, f"{s['mean']:.3f}", ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
                else:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=True, facecolor="0.85",
                                               hatch="///", edgecolor="tab:red", lw=0))
                    ax.text(j, i, f"×{s['diverged']}", ha="center", va="center", fontsize=7, color="tab:red")
        image = ax.imshow(grid, cmap="viridis_r", vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(len(cfg.betas)), [f"{b:g}" for b in cfg.betas], fontsize=6)
        ax.set_yticks(range(len(cfg.mus)), [f"{m:g}" for m in cfg.mus] if ax is axes[0][0] else [], fontsize=6)
        ax.set_xlabel("beta", fontsize=7)
        ax.set_title(v, fontsize=8)
    axes[0][0].set_ylabel("mu", fontsize=7)
    cbar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, pad=0.02)
    cbar.ax.tick_params(labelsize=6)
    cbar.set_label("mean E over seeds (×k: k seeds diverged)", fontsize=6)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def write_outputs(cfg: StudyConfig, runs: list[dict], out: Path, figure: Optional[Path] = None) -> dict:
    rows = summarise(cfg, runs)
    write_csv(out / "safeguard_runs.csv",
              ["variant", "mu", "beta", "seed", "E", "val_acc", "diverged", "reason", "skipped_steps",
               "final_lr", "max_lr", "min_lr", "seconds"],
              [[r["variant"], r["mu"], r["beta"], r["seed"], r["E"], r["val_acc"], r["diverged"], r["reason"],
                r["skipped_steps"], r["final_lr"], r["max_lr"], r["min_lr"], r["seconds"]] for r in runs])
    stats = cell_stats(runs)
    results = dict(config=asdict(cfg), variants={v: VARIANTS[v] for v in cfg.variants}, summary=rows,
                   cells=[dict(variant=k[0], mu=k[1], beta=k[2], **s) for k, s in sorted(stats.items())],
                   runs=runs)
    write_json(out / "safeguard_results.json", results)
    (out / "safeguard_table.md").write_text(summary_table(rows) + "\n" + cell_table(cfg, runs))
    plot_heatmap(cfg, runs, out / "safeguard_heatmap.png")
    if figure is not None:
        figure.parent.mkdir(parents=True, exist_ok=True)
        plot_heatmap(cfg, runs, figure)
    return results


# ----------------------------------------------------------------------------- command line
def _floats(text: str) -> tuple:
    return tuple(float(v) for v in text.split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marthe_experiments.safeguard_study",
                                description="E1's (mu, beta) grid for the faithful MARTHE and each safeguard.")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="tiny data (bundled digits), 1 seed, 30 steps, mu in {0, 0.99, 1} x beta in {1e-3, 1e-1}: seconds")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1; default 3, quick 1)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--mus", type=_floats, default=None)
    p.add_argument("--betas", type=_floats, default=None)
    p.add_argument("--steps", type=int, default=None, help="T (default 512)")
    p.add_argument("--val-batch", type=int, default=None,
                   help="validation examples per hypergradient (default 100; 0: the whole validation set)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workers", type=int, default=1, help="processes running grid cells in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--figure", type=Path, default=None, help="also save the heat map here")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    fields = dict(QUICK) if args.quick else {}
    if args.seeds is not None:
        fields["seeds"] = tuple(range(args.seeds))
    if args.variants:
        names = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {tuple(VARIANTS)}")
        fields["variants"] = names
    for name in ("mus", "betas", "steps", "data_dir"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.val_batch is not None:
        fields["val_batch"] = args.val_batch or None
    return StudyConfig(**fields)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Runs are keyed by (variant, mu, beta, seed): more seeds, variants or grid points may be
    # added to a study, but the problem itself (data, model, T, ...) must not change.
    problem = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items()
               if k not in ("seeds", "variants", "mus", "betas")}
    saved = out / "safeguard_config.json"
    if saved.exists() and json.loads(saved.read_text()) != problem:
        raise SystemExit(f"{out} holds runs of another configuration ({saved}); use another --out")
    saved.write_text(json.dumps(problem, indent=1) + "\n")
    runs = run_grid(cfg, out, workers=args.workers, threads=args.threads, progress=not args.no_progress)
    results = write_outputs(cfg, runs, out, figure=args.figure)
    print(summary_table(results["summary"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
