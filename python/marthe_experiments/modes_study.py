"""The price of MARTHE's cheaper steps: schedule quality and step time of each mode.

Modes (``marthe_ext.Marthe`` options; every one uses the default safeguards, "robust"):

* ``exact``: the full step (gradient, HVP, validation hypergradient every step);
* ``first-order``: ``first_order=True``, A_t with H_t = 0, no HVP at all;
* ``hvp-every-k`` (k = 2, 4, 8): ``hvp_every=k``, the exact HVP on steps t = 0 mod k only;
* ``sub-batch``: ``hvp_closure`` on the first quarter of each training batch (H estimated
  on fewer samples, every step);
* ``hypergrad-every-4``: ``hypergrad_every=4``, the validation pass and the LR update on
  every 4th step only (the tangent still moves every step);
* ``fixed-lr``: no hypergradient at all, eta0 throughout (torch.optim's optimizer): the
  reference that says whether scheduling helped.

Two setups, small enough for 2 busy CPU cores:

* ``e1``: E1's protocol (Donini et al. 2020, section 5.1): the paper's 500-500-500 ReLU MLP,
  plain SGD from eta0 = 0.01, fixed mini-batches of 100, MARTHE in validation mode with
  mu = 0.99 (validation mini-batches of 100), E = the whole validation set's loss after T
  steps. On the bundled digits (Fashion-MNIST is not installed here), T = 256.
* ``e2``: an E2-style BatchNorm CNN: VGG-11's layout at width 8 on the digits (8x8, so
  three of the five pools), SGD-momentum 0.9 from eta0 = 0.1, weight decay 5e-4, grad
  clip 100, batches of 64, mu = 0.99, T = 160, BN in train mode for the hypergradient.

For each setup x mode x beta x seed one run; divergence as in the safeguard study (a
skipped step, a non-finite loss, or E above the initial validation loss E0). Summary per
(setup, mode): best E (the lowest mean-over-seeds E over beta among cells with no
divergence), median E over beta of the cell means (a diverged cell counts as +inf), the
median paired difference to the exact mode (same seed and beta; the median, because one
bad run of either side would dominate a mean), the worst run's E, divergences, and the step
time relative to a plain step of the same dynamics (torch.optim.SGD with
``loss.backward()``), measured in the same process by interleaved timing blocks so that
the load of other processes affects every mode alike.

Outputs in ``--out`` (default ``python/results/modes``): ``modes_runs.jsonl`` (one line per
run, appended as runs end: an interrupted study resumes), ``modes_timing.json``,
``modes_results.json`` and ``modes_table.md``.

Run: ``python python/run.py modes [--quick] [--setups e1,e2] [--seeds N] [--betas ...]``.
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

import marthe_ext

from .data import load_splits
from .models import build_model
from .report import markdown_table, read_run_log, write_json
from .training import batch_schedule, evaluate

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "modes"

# mode -> Marthe options (None: the fixed-LR baseline); "sub-batch" also passes hvp_closure.
MODES: dict[str, Optional[dict]] = {
    "exact": {},
    "first-order": {"first_order": True},
    "hvp-every-2": {"hvp_every": 2},
    "hvp-every-4": {"hvp_every": 4},
    "hvp-every-8": {"hvp_every": 8},
    "sub-batch": {},
    "hypergrad-every-4": {"hypergrad_every": 4},
    "fixed-lr": None,
}
SUB_BATCH_FRACTION = 4  # sub-batch: the HVP on the first 1/4 of the batch


@dataclass(frozen=True)
class Setup:
    name: str
    model: str
    dynamics: str
    eta0: float
    steps: int
    n_train: int
    n_val: int
    batch_size: int
    val_batch: int
    hidden: tuple = (500, 500, 500)
    width: int = 8
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    mu: float = 0.99
    dataset: str = "digits"


SETUPS = {
    "e1": Setup("e1", "mlp", "sgd", eta0=0.01, steps=256, n_train=1000, n_val=300, batch_size=100,
                val_batch=100),
    "e2": Setup("e2", "vgg", "sgdm", eta0=0.1, steps=160, n_train=1024, n_val=300, batch_size=64,
                val_batch=64, width=8, weight_decay=5e-4, grad_clip=100.0),
}
QUICK_SETUPS = {
    "e1": Setup("e1", "mlp", "sgd", eta0=0.01, steps=24, n_train=400, n_val=100, batch_size=50,
                val_batch=50, hidden=(32, 32)),
    "e2": Setup("e2", "vgg", "sgdm", eta0=0.1, steps=16, n_train=256, n_val=100, batch_size=32,
                val_batch=32, width=4, weight_decay=5e-4, grad_clip=100.0),
}


@dataclass
class StudyConfig:
    setups: tuple = ("e1", "e2")
    modes: tuple = tuple(MODES)
    betas: tuple = (1e-3, 1e-2, 1e-1)
    seeds: tuple = (0, 1, 2)
    timing_steps: int = 16   # steps per timing block: a multiple of every k above
    timing_rounds: int = 5   # interleaved blocks per mode
    quick: bool = False

    def setup(self, name: str) -> Setup:
        return (QUICK_SETUPS if self.quick else SETUPS)[name]


def run_key(setup: str, mode: str, beta: float, seed: int) -> str:
    return f"{setup}|{mode}|{beta:g}|{seed}"


# ----------------------------------------------------------------------------- one problem
class Problem:
    """Data, initial weights and batch schedules of one (setup, seed): identical for every mode."""

    def __init__(self, setup: Setup, seed: int):
        self.setup = setup
        self.data = load_splits(setup.dataset, setup.n_train, setup.n_val, n_test=1, seed=seed)
        torch.manual_seed(seed)
        self.init = self.new_model().state_dict()
        self.batches = batch_schedule(len(self.data.x_train), setup.batch_size, setup.steps, seed=seed)
        self.val_idx = batch_schedule(len(self.data.x_val), setup.val_batch, setup.steps, seed=seed + 1)
        model = self.model()
        model.eval()
        self.e0, _ = evaluate(model, self.data.x_val, self.data.y_val)

    def new_model(self) -> torch.nn.Module:
        s = self.setup
        return build_model(s.model, self.data.input_shape, self.data.num_classes, hidden=s.hidden, width=s.width)

    def model(self) -> torch.nn.Module:
        model = self.new_model()
        model.load_state_dict(self.init)
        model.train()
        return model

    def closures(self, model: torch.nn.Module, t: int):
        """Training, validation and sub-batch closures of step t."""
        d = self.data
        idx = self.batches[t % len(self.batches)]
        xb, yb = d.x_train[idx], d.y_train[idx]
        vidx = self.val_idx[t % len(self.val_idx)]
        xv, yv = d.x_val[vidx], d.y_val[vidx]
        sub = max(1, len(idx) // SUB_BATCH_FRACTION)

        def train() -> torch.Tensor:
            return F.cross_entropy(model(xb), yb)

        def val() -> torch.Tensor:
            with marthe_ext.preserved_buffers(model):  # BN statistics move with training only
                return F.cross_entropy(model(xv), yv)

        def hvp_sub() -> torch.Tensor:
            return F.cross_entropy(model(xb[:sub]), yb[:sub])

        return train, val, hvp_sub


class Stepper:
    """One optimizer for one mode; ``step(t)`` takes training step t."""

    def __init__(self, problem: Problem, mode: str, beta: float):
        s = problem.setup
        self.problem, self.mode = problem, mode
        self.model = problem.model()
        params = list(self.model.parameters())
        options = MODES[mode]
        if options is None:
            self.opt = torch.optim.SGD(params, lr=s.eta0, momentum=s.momentum if s.dynamics == "sgdm" else 0.0,
                                       weight_decay=s.weight_decay)
        else:
            self.opt = marthe_ext.Marthe(
                params, lr=s.eta0, dynamics=s.dynamics, momentum=s.momentum, weight_decay=s.weight_decay,
                grad_clip=s.grad_clip, mu=s.mu, hyper_lr=beta, model=self.model, **options)

    def step(self, t: int) -> float:
        train, val, hvp_sub = self.problem.closures(self.model, t)
        if isinstance(self.opt, marthe_ext.Marthe):
            extra = {"hvp_closure": hvp_sub} if self.mode == "sub-batch" else {}
            return float(self.opt.step(train, val_closure=val, **extra))
        self.opt.zero_grad(set_to_none=True)
        loss = train()
        loss.backward()
        if self.problem.setup.grad_clip is not None:  # the same elementwise clip as Marthe's
            for p in self.model.parameters():
                p.grad.clamp_(-self.problem.setup.grad_clip, self.problem.setup.grad_clip)
        self.opt.step()
        return float(loss.detach())

    @property
    def lr(self) -> float:
        return self.opt.lr if isinstance(self.opt, marthe_ext.Marthe) else self.problem.setup.eta0

    @property
    def skipped(self) -> int:
        return self.opt.skipped_steps if isinstance(self.opt, marthe_ext.Marthe) else 0


def run_one(problem: Problem, mode: str, beta: float, seed: int) -> dict:
    """T steps of one mode; E, the divergence verdict and the LR trajectory (every 8th step)."""
    setup = problem.setup
    stepper = Stepper(problem, mode, beta)
    lrs, reason, stopped_at = [setup.eta0], None, None
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skipped steps are counted, not warned
        for t in range(setup.steps):
            loss = stepper.step(t)
            if (t + 1) % 8 == 0 or t + 1 == setup.steps:
                lrs.append(stepper.lr)
            if stepper.skipped > 0:
                reason, stopped_at = "skipped step", t
                break
            if not math.isfinite(loss):
                reason, stopped_at = "non-finite training loss", t
                break
    seconds = time.perf_counter() - started
    model = stepper.model
    if reason is None:
        recalibrate_bn(model, problem.data.x_train, problem.batches[:8])
    model.eval()
    with torch.no_grad():
        e, acc = evaluate(model, problem.data.x_val, problem.data.y_val)
    if reason is None and not math.isfinite(e):
        reason = "non-finite E"
    elif reason is None and e > problem.e0:
        reason = "E above the initial loss"
    return dict(key=run_key(setup.name, mode, beta, seed), setup=setup.name, mode=mode, beta=beta, seed=seed,
                E=e if math.isfinite(e) else None, val_acc=acc, E0=problem.e0, diverged=reason is not None,
                reason=reason, stopped_at=stopped_at, final_lr=stepper.lr, max_lr=max(lrs), lrs=lrs,
                seconds=seconds)


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, x: torch.Tensor, batches: torch.Tensor) -> None:
    """BatchNorm running statistics recomputed for the final weights (a plain average over
    the batches), as E2 does before its test evaluation: E then measures the weights, not
    how far the exponential running averages lag behind a short run."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for idx in batches:
        model(x[idx])
    for bn, m in zip(bns, momenta):
        bn.momentum = m


# ----------------------------------------------------------------------------- timing
def time_modes(problem: Problem, modes: Sequence[str], beta: float, steps: int, rounds: int) -> dict:
    """Seconds per step of each mode and of the plain step, from interleaved blocks.

    Each round times ``steps`` steps of every mode in turn (after one untimed warm-up block
    each), so a change in the machine's load hits every mode alike; the per-mode time is the
    median block. Returns {mode: seconds per step} with "plain" the fixed-LR torch step.
    """
    names = ["plain"] + [m for m in modes if m != "fixed-lr"]
    steppers = {m: Stepper(problem, "fixed-lr" if m == "plain" else m, beta) for m in names}
    counters = {m: 0 for m in names}
    blocks: dict[str, list[float]] = {m: [] for m in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for r in range(rounds + 1):
            for m in names:
                started = time.perf_counter()
                for _ in range(steps):
                    steppers[m].step(counters[m])
                    counters[m] += 1
                if r > 0:  # round 0 warms up (first-step allocations, the backend's first use)
                    blocks[m].append((time.perf_counter() - started) / steps)
    return {m: statistics.median(b) for m, b in blocks.items()}


# ----------------------------------------------------------------------------- the study
def run_study(cfg: StudyConfig, out: Path, progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "modes_runs.jsonl"
    done = read_run_log(log_path)
    timing_path = out / "modes_timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    started = time.perf_counter()
    with open(log_path, "a") as log:
        for name in cfg.setups:
            setup = cfg.setup(name)
            for seed in cfg.seeds:
                problem = None
                for mode in cfg.modes:
                    # The fixed-LR baseline does not depend on beta: one run serves them all.
                    betas = cfg.betas[:1] if MODES[mode] is None else cfg.betas
                    for beta in betas:
                        key = run_key(name, mode, beta, seed)
                        if key in done:
                            continue
                        problem = problem or Problem(setup, seed)
                        r = run_one(problem, mode, beta, seed)
                        done[key] = r
                        log.write(json.dumps(r) + "\n")
                        log.flush()
                        if progress:
                            verdict = f" DIVERGED ({r['reason']})" if r["diverged"] else ""
                            e = "inf" if r["E"] is None else f"{r['E']:.4f}"
                            print(f"[{time.perf_counter() - started:6.0f}s] {key}: E={e} lr={r['final_lr']:.3g}"
                                  f"{verdict} {r['seconds']:.1f}s", flush=True)
            if name not in timing:
                problem = Problem(setup, cfg.seeds[0])
                per_step = time_modes(problem, cfg.modes, cfg.betas[len(cfg.betas) // 2],
                                      cfg.timing_steps, cfg.timing_rounds)
                timing[name] = dict(seconds_per_step=per_step, threads=torch.get_num_threads(),
                                    steps_per_block=cfg.timing_steps, rounds=cfg.timing_rounds)
                timing_path.write_text(json.dumps(timing, indent=1) + "\n")
                if progress:
                    print(f"[{time.perf_counter() - started:6.0f}s] {name} timing: "
                          + ", ".join(f"{m} {s * 1e3:.2f} ms" for m, s in per_step.items()), flush=True)
    runs = []
    for name in cfg.setups:
        for mode in cfg.modes:
            for beta in cfg.betas:
                for seed in cfg.seeds:
                    key = run_key(name, mode, cfg.betas[0] if MODES[mode] is None else beta, seed)
                    runs.append(dict(done[key], beta=beta, key=run_key(name, mode, beta, seed)))
    rows = summarise(cfg, runs, timing)
    results = dict(config=asdict(cfg), setups={n: asdict(cfg.setup(n)) for n in cfg.setups},
                   modes={m: MODES[m] for m in cfg.modes}, timing=timing, summary=rows, runs=runs)
    write_json(out / "modes_results.json", results)
    (out / "modes_table.md").write_text(summary_table(rows) + "\n" + cell_table(cfg, runs))
    return results


def _e(r: dict) -> float:
    return math.inf if r["E"] is None else r["E"]


def summarise(cfg: StudyConfig, runs: Sequence[dict], timing: dict) -> list[dict]:
    rows = []
    for name in cfg.setups:
        mine = [r for r in runs if r["setup"] == name]
        exact = {(r["beta"], r["seed"]): _e(r) for r in mine if r["mode"] == "exact"}
        per_step = timing.get(name, {}).get("seconds_per_step", {})
        for mode in cfg.modes:
            rs = [r for r in mine if r["mode"] == mode]
            cells = {}
            for beta in cfg.betas:
                es = [_e(r) for r in rs if r["beta"] == beta]
                div = sum(r["diverged"] for r in rs if r["beta"] == beta)
                cells[beta] = (statistics.fmean(es) if not div else math.inf, div, es)
            clean = [c[0] for c in cells.values() if c[1] == 0]
            best = min(clean) if clean else math.inf
            best_beta = min((b for b, c in cells.items() if c[1] == 0), key=lambda b: cells[b][0], default=None)
            best_std = statistics.pstdev(cells[best_beta][2]) if best_beta is not None else math.nan
            median = statistics.median(c[0] for c in cells.values())
            pairs = [_e(r) - exact[(r["beta"], r["seed"])] for r in rs
                     if not r["diverged"] and math.isfinite(exact.get((r["beta"], r["seed"]), math.inf))]
            mode_time = per_step.get("plain" if mode == "fixed-lr" else mode)
            plain = per_step.get("plain")
            # The fixed-LR run stands for every beta: count each of its runs once.
            distinct = rs if MODES[mode] is not None else [r for r in rs if r["beta"] == cfg.betas[0]]
            rows.append(dict(
                setup=name, mode=mode, options=MODES[mode], best_E=best, best_E_std=best_std,
                best_beta=best_beta, median_E=median,
                median_diff_vs_exact=statistics.median(pairs) if pairs and mode != "exact" else (
                    0.0 if mode == "exact" else math.nan),
                worst_E=max(_e(r) for r in rs),
                diverged=sum(r["diverged"] for r in distinct),
                runs=len(distinct),
                ms_per_step=None if mode_time is None else mode_time * 1e3,
                time_vs_plain=None if mode_time is None or not plain else mode_time / plain))
    return rows


def summary_table(rows: Sequence[dict]) -> str:
    header = ["setup", "mode", "best E (mean ± std over seeds)", "at beta", "median E over beta",
              "median of E − exact (paired)", "worst run's E", "diverged", "ms / step", "step time / plain step"]
    out = []
    for r in rows:
        best = "-" if not math.isfinite(r["best_E"]) else f"{r['best_E']:.4f} ± {r['best_E_std']:.4f}"
        beta = "-" if r["best_beta"] is None or r["options"] is None else f"{r['best_beta']:g}"
        d = r["median_diff_vs_exact"]
        diff = "-" if r["mode"] == "exact" or math.isnan(d) else f"{d:+.4f}"
        median = "inf (a cell diverged)" if not math.isfinite(r["median_E"]) else f"{r['median_E']:.4f}"
        ms = "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.2f}"
        ratio = "-" if r["time_vs_plain"] is None else f"{r['time_vs_plain']:.2f}x"
        out.append([r["setup"], r["mode"], best, beta, median, diff, f"{r['worst_E']:.4f}",
                    f"{r['diverged']} / {r['runs']}", ms, ratio])
    return markdown_table(header, out)


def cell_table(cfg: StudyConfig, runs: Sequence[dict]) -> str:
    """Per setup: mode x beta, the mean E over seeds ("k div" where k seeds diverged)."""
    parts = []
    for name in cfg.setups:
        rows = []
        for mode in cfg.modes:
            row = [mode]
            for beta in cfg.betas:
                rs = [r for r in runs if r["setup"] == name and r["mode"] == mode and r["beta"] == beta]
                div = sum(r["diverged"] for r in rs)
                row.append(f"{div} div" if div else f"{statistics.fmean(_e(r) for r in rs):.4f}")
            rows.append(row)
        parts.append(f"\n**{name}**: mean E over seeds per beta\n\n"
                     + markdown_table(["mode \\ beta"] + [f"{b:g}" for b in cfg.betas], rows))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- command line
def _floats(text: str) -> tuple:
    return tuple(float(v) for v in text.split(",") if v)


def _words(text: str) -> tuple:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py modes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed, 2 betas: seconds (a smoke test)")
    p.add_argument("--setups", type=_words, default=None, help=f"comma-separated, from {tuple(SETUPS)}")
    p.add_argument("--modes", type=_words, default=None, help=f"comma-separated, from {tuple(MODES)}")
    p.add_argument("--betas", type=_floats, default=None, help="hyper_lr grid (default 1e-3,1e-2,1e-1)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    fields: dict = {}
    if args.quick:
        fields.update(quick=True, seeds=(0,), betas=(1e-2, 1e-1), timing_steps=8, timing_rounds=1)
    for name, allowed in (("setups", SETUPS), ("modes", MODES)):
        value = getattr(args, name)
        if value:
            unknown = [v for v in value if v not in allowed]
            if unknown:
                raise SystemExit(f"unknown {name} {unknown}; choose from {tuple(allowed)}")
            fields[name] = value
    if "modes" in fields and "exact" not in fields["modes"]:
        fields["modes"] = ("exact",) + fields["modes"]  # the paired differences need it
    if args.betas:
        fields["betas"] = args.betas
    if args.seeds is not None:
        fields["seeds"] = tuple(range(args.seeds))
    return StudyConfig(**fields)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="marthe_ext. no fast backend")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Runs are keyed by (setup, mode, beta, seed): the problems themselves must not change.
    problem = dict(quick=cfg.quick, setups={n: asdict(cfg.setup(n)) for n in cfg.setups})
    saved = out / "modes_config.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        if old.get("quick") != cfg.quick or any(old["setups"].get(n, v) != json.loads(json.dumps(v))
                                                  for n, v in problem["setups"].items()):
            raise SystemExit(f"{out} holds runs of another configuration ({saved}); use another --out")
        problem["setups"] = {**old["setups"], **problem["setups"]}
    saved.write_text(json.dumps(problem, indent=1) + "\n")
    results = run_study(cfg, out, progress=not args.no_progress)
    print(summary_table(results["summary"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
