"""Issue 15's study (python/marthe_experiments/default_study.py): its verdicts on hand-made
runs (collapse, far from its own best, frozen LR, the comparison with the best baseline),
and the whole pipeline -- runs, resume, tables, figures -- on a tiny setup."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from marthe_experiments import default_study as study

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(method, config, seed, E, lrs=(0.1,) * 5):
    return dict(setup="s", method=method, config=config, seed=seed, E=E, lrs=list(lrs))


def test_summary_counts_collapses_far_runs_and_compares_with_the_best_baseline():
    runs = [_run("robust-2", "beta=0.001", 0, 0.10), _run("robust-2", "beta=0.001", 1, 0.12),
            _run("robust-2", "beta=0.1", 0, None), _run("robust-2", "beta=0.1", 1, 0.20),
            _run("robust-2", "beta=0.01", 0, 0.14), _run("robust-2", "beta=0.01", 1, 0.12),
            _run("Constant", "lr=0.1", 0, 0.10), _run("Constant", "lr=0.1", 1, 0.10),
            _run("Constant", "lr=1", 0, 2.3), _run("Constant", "lr=1", 1, 0.05),
            _run("SF", "lr=0.3", 0, 0.125), _run("SF", "lr=0.3", 1, 0.125)]
    summ = study.setup_summary(runs, ["robust-2"])
    assert summ["baselines"]["Constant"] == (pytest.approx(0.10), "lr=0.1", 2)  # mean over seeds
    assert summ["best_baseline"] == pytest.approx(0.10)
    row = summ["variants"]["robust-2"]
    assert row["means"]["beta=0.1"] == math.inf                # a diverged seed makes its beta inf
    assert row["best"] == pytest.approx(0.11) and row["median"] == pytest.approx(0.13)
    assert row["collapses"] == 1 and row["far"] == 1            # None; 0.20 > 1.5 x 0.12 (seed 1's best)
    assert row["best_vs_baseline"] == pytest.approx(0.1)


def test_far_compares_a_run_with_the_best_beta_of_its_own_seed():
    # seed 1's split is harder: 0.16 and 0.18 are > 1.5 x seed 0's best, not far from seed 1's
    runs = [_run("robust-2", "beta=0.001", 0, 0.10), _run("robust-2", "beta=0.1", 0, 0.16),
            _run("robust-2", "beta=0.001", 1, 0.16), _run("robust-2", "beta=0.1", 1, 0.18)]
    row = study.setup_summary(runs, ["robust-2"])["variants"]["robust-2"]
    assert row["far"] == 1                                      # only seed 0's 0.16
    assert math.isnan(row["best_vs_baseline"]) and study._pct(row["best_vs_baseline"]) == "-"


def test_decay_share_counts_positive_hypergradients_among_the_nonzero_ones():
    assert study.decay_share([1.0, -2.0, 0.0, 3.0, float("nan")]) == pytest.approx(2 / 3)
    assert math.isnan(study.decay_share([0.0, 0.0]))


def test_frozen_means_no_relative_move_over_the_window():
    assert study.frozen([0.1] * 50 + [0.2] * 101)
    assert not study.frozen([0.1] * 50 + [0.2 * (1 + 0.01 * (i % 2)) for i in range(101)])
    assert not study.frozen([0.1] * 20)                          # shorter than the window


def test_averaging_table_takes_each_kind_of_E_from_its_own_best_config(tmp_path):
    records = tmp_path / "records" / "s"
    records.mkdir(parents=True)
    last = study.LAST_REFRESHED
    runs = [_run("robust-2", "beta=0.001", 0, 0.30) | {"E_avg": {last: 0.3, "ema0.99": 0.20, "uniform": 0.25}},
            _run("robust-2", "beta=0.1", 0, 0.28) | {"E_avg": {last: 0.29, "ema0.99": 0.22, "uniform": None}},
            _run("Exponential", "lr=0.1,to=0.1", 0, 0.26) | {"E_avg": {last: 0.2, "ema0.99": 0.24, "uniform": 0.23}},
            _run("Exponential", "lr=1,to=0.1", 0, 0.27) | {"E_avg": {last: 0.1, "ema0.99": 0.21, "uniform": 0.29}},
            _run("SF", "lr=0.3", 0, 0.19),                          # evaluated at its own average
            _run("Constant", "lr=0.1", 0, 0.10)]                    # no E_avg (an older record): left out
    for i, r in enumerate(runs):
        (records / f"{i}.json").write_text(json.dumps(r))
    table = study.averaging_table(tmp_path, "s", ["robust-2"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    # the last iterate's best beta is 0.1; the EMA's best is 0.001; a diverged average is inf
    assert rows["robust-2"][:4] == ["0.2800 (0.1) / 0.2900", "0.2900 (0.1) / 0.2950", "0.2000 (0.001) / 0.2100",
                                    "0.2500 (0.001) / inf"]
    assert rows["Exponential"][:4] == ["0.2600 (lr=0.1,to=0.1)", "0.1000 (lr=1,to=0.1)", "0.2100 (lr=1,to=0.1)",
                                       "0.2300 (lr=0.1,to=0.1)"]
    assert rows["SF"][:4] == ["0.1900 (lr=0.3)"] * 4 and "Constant" not in rows
    # a study whose records predate the averages has no such table
    for path in records.glob("*.json"):
        rec = json.loads(path.read_text())
        rec.pop("E_avg", None)
        path.write_text(json.dumps(rec))
    assert study.averaging_table(tmp_path, "s", ["robust-2"]) is None


def test_averaged_E_refreshes_batchnorm_statistics_before_evaluating():
    import copy
    from types import SimpleNamespace

    import torch

    from marthe_experiments.models import build_model
    from marthe_experiments.training import evaluate, recalibrate_bn

    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10)
    data = SimpleNamespace(x_train=torch.randn(64, 1, 28, 28), x_val=torch.randn(32, 1, 28, 28),
                           y_val=torch.randint(0, 10, (32,)))
    batches = torch.arange(64).view(8, 8)
    with torch.no_grad():  # weights away from the initial ones (whose output ignores the input)
        for w in model.parameters():
            w.add_(0.3 * torch.randn_like(w))
    for m in model.modules():  # statistics that belong to other weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
    stale = evaluate(copy.deepcopy(model).eval(), data.x_val, data.y_val)[0]
    expected = copy.deepcopy(model).train()
    recalibrate_bn(expected, data.x_train, batches[:8])
    refreshed = study.averaged_E(model, data, batches)
    assert refreshed == pytest.approx(evaluate(expected.eval(), data.x_val, data.y_val)[0], rel=1e-6)
    assert abs(refreshed - stale) > 0.01 and not model.training


def test_replication_table_pairs_the_same_jobs_of_two_studies(tmp_path):
    for name, E in (("a", (0.50, 0.60)), ("b", (0.55, 0.60))):
        records = tmp_path / name / "records" / "s"
        records.mkdir(parents=True)
        for seed, e in enumerate(E):
            (records / f"{seed}.json").write_text(json.dumps(_run("Constant", "lr=0.1", seed, e)))
        (records / "x.json").write_text(json.dumps(_run("SF", "lr=1", 0, 0.4)))  # one side only in b
    (tmp_path / "a" / "records" / "s" / "x.json").unlink()
    table = study.replication_table(tmp_path / "b", tmp_path / "a", "s")
    assert "| Constant | lr=0.1 | 0.5500 | 0.5750 | 10.0 % | 2 |" in table and "SF" not in table


def test_the_whole_study_on_a_tiny_setup(tmp_path, monkeypatch):
    tiny = dataclasses.replace(study.SETUPS["digits"], n_train=200, n_val=60, steps=12, batch=20, val_batch=10,
                               hidden=(8,), constants=(0.1,), decay_to=(0.1,), sf_lrs=(0.1,))
    monkeypatch.setattr(study, "SETUPS", {"digits": tiny})
    monkeypatch.setattr(study, "BETAS", (1e-3, 1e-1))
    out = tmp_path / "study"
    study.main(["--quick", "--out", str(out), "--workers", "1"])
    runs = sorted((out / "records" / "digits").glob("*.json"))
    # 4 variants x 2 betas x 2 seeds, and per seed: constant, exponential, schedule-free, Prodigy
    assert len(runs) == 4 * 2 * 2 + 2 * 4
    run = json.loads((out / "records" / "digits" / "robust-2+trend2__beta=0.001__s0.json").read_text())
    assert len(run["lrs"]) == len(run["betas"]) == len(run["hs"]) == 12 and run["E"] > 0
    # every run but schedule-free's (already an average) also records its iterate averages,
    # which are other weights than the last iterate's
    for path in runs:
        rec = json.loads(path.read_text())
        if rec["method"] == "SF":
            assert rec["E_avg"] == {}
        else:
            assert set(rec["E_avg"]) == {*study.AVERAGES, study.LAST_REFRESHED}
            assert all(e > 0 for e in rec["E_avg"].values()) and rec["E_avg"]["uniform"] != rec["E"]
            # without BatchNorm, refreshing changes nothing: the last iterate's E again
            assert rec["E_avg"][study.LAST_REFRESHED] == pytest.approx(rec["E"], rel=1e-4)
    table = (out / "table.md").read_text()
    assert "| digits | robust-2+trend2 |" in table and "| Constant |" in table
    assert "## Iterate averages: digits" in table and "| ema0.99: best (config) |" in table
    assert (out / "lr_digits.png").stat().st_size > 0
    # resumes: nothing is run again, the files are untouched
    stamp = {p: p.stat().st_mtime_ns for p in runs}
    study.main(["--quick", "--out", str(out), "--workers", "1"])
    assert {p: p.stat().st_mtime_ns for p in runs} == stamp
    # --betas runs a subset of the grid, next to the records already there
    study.main(["--quick", "--out", str(out), "--workers", "1", "--variants", "robust-2+rprop0.75@bn-train",
                "--betas", "0.1", "--no-baselines"])
    extra = sorted((out / "records" / "digits").glob("robust-2+rprop0.75@bn-train__*.json"))
    assert [p.name for p in extra] == [f"robust-2+rprop0.75@bn-train__beta=0.1__s{s}.json" for s in (0, 1)]


def test_robust_2_trend2_is_the_library_default_and_robust_2_robust_1_the_previous_ones():
    import torch

    import marthe_ext

    w = [torch.nn.Parameter(torch.zeros(2))]
    keys = ("hypergrad_norm", "max_lr_growth", "max_lr_change", "max_tangent_ratio", "hyper_lr_rprop",
            "hyper_lr_bounds", "loss_trust", "decay_trend")
    default = marthe_ext.Marthe(w)
    new = marthe_ext.Marthe(w, **study.VARIANTS["robust-2+trend2"])
    assert {k: getattr(new, k) for k in keys} == {k: getattr(default, k) for k in keys}
    before = marthe_ext.Marthe(w, **study.VARIANTS["robust-2"])
    old = marthe_ext.Marthe(w, **study.VARIANTS["robust-1"])
    assert (before.loss_trust, before.decay_trend) == (0.5, None)
    assert (old.hyper_lr_rprop, old.loss_trust, old.decay_trend) == ((0.5, 1.2), None, None)


def test_a_missing_data_set_stops_the_study_and_a_run_that_raised_is_tried_again(tmp_path, monkeypatch):
    from marthe_experiments.data import DataError

    tiny = dataclasses.replace(study.SETUPS["digits"], n_train=200, n_val=60, steps=4, batch=20, val_batch=10,
                               hidden=(8,))
    monkeypatch.setattr(study, "SETUPS", {"digits": tiny})
    monkeypatch.setattr(study, "BETAS", (1e-3,))
    out = tmp_path / "study"
    args = (out, ["digits"], ["robust-2+trend2"], [0], False, 1)
    real = study.run_job

    def no_data(job):
        raise DataError("digits: data directory /nowhere does not exist")

    monkeypatch.setattr(study, "run_job", no_data)
    with pytest.raises(DataError, match="/nowhere"):
        study.run_study(*args)
    assert list((out / "records" / "digits").glob("*.json")) == []  # nothing cached as a result

    def broken(job):
        raise ValueError("a bug in one run")

    monkeypatch.setattr(study, "run_job", broken)
    study.run_study(*args)  # any other failure is recorded and the study goes on
    path = out / "records" / "digits" / "robust-2+trend2__beta=0.001__s0.json"
    assert json.loads(path.read_text())["error"] == "ValueError: a bug in one run"
    monkeypatch.setattr(study, "run_job", real)
    study.run_study(*args)  # ... and run again next time
    rec = json.loads(path.read_text())
    assert "error" not in rec and rec["E"] > 0


def test_a_variant_can_start_from_a_multiple_of_the_setups_eta0(monkeypatch):
    tiny = dataclasses.replace(study.SETUPS["digits"], n_train=200, n_val=60, steps=3, batch=20, val_batch=10,
                               hidden=(8,))
    monkeypatch.setattr(study, "SETUPS", {"digits": tiny})
    first = {}
    for variant in ("robust-2+trend2", "robust-2+trend2@eta0x3"):
        rec = study.run_job(study.Job("digits", variant, "beta=0.001", 0))
        first[variant] = rec["lrs"][0]
    # (b) bounds one relative step by beta / sqrt(1 - 0.99) = 1 %, (a') growth by 10 %
    assert first["robust-2+trend2"] == pytest.approx(tiny.eta0, rel=0.011)
    assert first["robust-2+trend2@eta0x3"] == pytest.approx(3 * tiny.eta0, rel=0.011)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_the_ema_hypergradient_is_that_of_the_iterates_average_and_leaves_the_weights_as_they_were(weight):
    import torch

    import marthe_ext

    torch.manual_seed(0)
    x, y, xv, yv = torch.randn(16, 3), torch.randn(16), torch.randn(8, 3), torch.randn(8)
    w = torch.nn.Parameter(torch.randn(3))
    opt = marthe_ext.Marthe([w], lr=0.05, safeguards=None, mu=0.9)
    d = 0.8
    study.ema_hypergradient(opt, d, weight)
    seen = []  # the weights each validation pass sees

    def val_loss():
        seen.append(w.detach().clone())
        return ((xv @ w - yv) ** 2).mean()

    starts, lrs = [], []  # the weights each update starts from, and its LR

    def train_loss():
        starts.append(w.detach().clone())
        return ((x @ w - y) ** 2).mean()

    def grad_e(v):
        return 2 * xv.T @ (xv @ v - yv) / len(yv)

    w_bar = z_bar = None
    for _ in range(4):
        lrs.append(opt.lr)
        opt.step(train_loss, val_loss)
        w_now, z_now = w.detach().clone(), opt.state[w]["tangent"].clone()
        w_bar = w_now if w_bar is None else d * w_bar + (1 - d) * w_now
        z_bar = z_now if z_bar is None else d * z_bar + (1 - d) * z_now
        assert torch.allclose(seen[-1], w_bar, atol=1e-7)  # E is taken at the average ...
        h = float(grad_e(w_bar) @ z_bar)  # ... along Z_bar; with weight < 1, mixed with the one-step h
        if weight < 1:
            assert torch.equal(seen[-2], w_now)
            h = (1 - weight) * float(grad_e(w_now) @ z_now) + weight * h
        assert opt.last_hypergrad == pytest.approx(h, rel=1e-5)
    # each SGD update starts where the previous one ended, not at the average the
    # validation pass saw: the pass puts the last iterate back
    assert not torch.allclose(w_now, w_bar)
    for t in range(3):
        grad = 2 * x.T @ (x @ starts[t] - y) / len(y)
        assert torch.allclose(starts[t + 1], starts[t] - lrs[t] * grad, atol=1e-6)


@pytest.mark.parametrize("both", [False, True])
def test_horizon_damping_discounts_early_decreases_and_leaves_increases(both):
    """The study's prototype: a decrease by r at the t-th update becomes r^(t / T) (r from
    the undamped rule, taken from the same state), an increase is the rule's own (with
    ``both``: damped alike)."""
    import torch

    import marthe_ext

    def make():
        w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        return w, marthe_ext.Marthe([w], dynamics="sgd", mu=0.0, backend="torch", lr=0.1, hyper_lr=0.05)

    (w, damped), (v, plain) = make(), make()
    horizon = 6
    study.horizon_damping(damped, horizon, "both" if both else "decreases")
    hs = [1.0, 2.0, -1.0, 1.5, 0.5, 3.0, -0.5, 1.0, 2.0, 1.0]
    fell = rose = 0
    for t, h in enumerate(hs):
        for key, value in damped._controller.scalars.items():  # the same state before the step
            plain._controller.scalars[key].copy_(value)
        before = damped.lr
        # one weight, training loss w, validation loss -h w: the hypergradient is h (test_hyper_rules)
        damped.step(lambda: w.sum(), lambda: -h * w.sum())
        plain.step(lambda: v.sum(), lambda: -h * v.sum())
        fell += plain.lr < before
        rose += plain.lr > before
        if plain.lr < before or both:
            assert damped.lr == pytest.approx(before * (plain.lr / before) ** min(t / horizon, 1.0), rel=1e-12)
        else:
            assert damped.lr == plain.lr
    assert fell >= 5 and rose >= 2


def test_horizon_damping_keep_trust_never_damps_the_loss_trust_region_s_cap():
    """"keep-trust": a decrease to exactly the LR of the best loss (safeguard (e)'s cap) is
    taken whole; any other decrease is damped. A stand-in controller scripts the updates."""
    import types

    import torch

    def controller(new_lrs):
        scalars = {"eta": torch.tensor(1.0, dtype=torch.float64),
                   "lr_at_best": torch.tensor(0.25, dtype=torch.float64)}
        lrs = iter(new_lrs)
        return types.SimpleNamespace(scalars=scalars, update_lr=lambda h, ok, loss=None: scalars["eta"].fill_(next(lrs)))

    for mode, want in (("keep-trust", [1.0, 0.25, 0.25 * 0.5 ** 0.5]), ("decreases", [1.0, 0.25 ** 0.25, None])):
        ctl = controller([0.5, 0.25, 0.125])
        study.horizon_damping(types.SimpleNamespace(_controller=ctl), 4, mode)
        got = []
        for _ in range(3):
            ctl.update_lr(None, None)
            got.append(float(ctl.scalars["eta"]))
        assert got[:2] == pytest.approx(want[:2], rel=1e-12), mode
        if want[2] is not None:
            assert got[2] == pytest.approx(want[2], rel=1e-12)
    with pytest.raises(ValueError, match="damped_changes"):
        study.horizon_damping(types.SimpleNamespace(_controller=controller([])), 4, "all")
