"""The experiment framework (python/marthe_experiments): LRS-OPT's exact hypergradient,
the trainers, and E1 / E2 / the demo end to end on tiny data."""
import json
import math

import pytest
import torch

from marthe_experiments import cli
from marthe_experiments.demo import DemoConfig, run_demo
from marthe_experiments.e1 import e1_config, e1_methods, run_e1
from marthe_experiments.e2 import E2_METHODS, e2_config, family_of, run_e2, sample_configs
from marthe_experiments.lrs_opt import Unroll, optimise_schedule
from marthe_experiments.methods import MethodSpec, Protocol, Trainer, availability
from marthe_experiments.models import build_model, mlp
from marthe_experiments.training import batch_schedule, evaluate, train_run

pytestmark = [pytest.mark.filterwarnings("ignore:marthe_ext. no fast backend"),
              pytest.mark.usefixtures("one_thread")]


def _tiny_problem(T=7, k=None, dtype=torch.float64):
    torch.manual_seed(1)
    model = mlp(6, [7, 5], 3).to(dtype)
    x, y = torch.randn(40, 6, dtype=dtype), torch.randint(0, 3, (40,))
    xv, yv = torch.randn(15, 6, dtype=dtype), torch.randint(0, 3, (15,))
    batches = batch_schedule(40, 8, T, seed=0)
    return Unroll(model, [p.detach() for p in model.parameters()], x, y, batches, xv, yv, checkpoint_every=k)


def test_lrs_opt_hypergradient_matches_float64_finite_differences():
    unroll = _tiny_problem()
    etas = torch.rand(unroll.T, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3
    E, grad = unroll.value_and_grad(etas)
    h = 1e-6
    fd = torch.tensor([(unroll.forward(etas + h * e).E - unroll.forward(etas - h * e).E) / (2 * h)
                       for e in torch.eye(unroll.T, dtype=torch.float64)], dtype=torch.float64)
    assert math.isfinite(E)
    assert float((grad - fd).abs().max()) <= 1e-7 * float(fd.abs().max())
    assert float(fd.abs().min()) > 0  # every coordinate is checked, none trivially zero


@pytest.mark.parametrize("k", [2, 3, 7])
def test_lrs_opt_checkpointing_gives_the_same_hypergradient(k):
    etas = torch.linspace(0.05, 0.2, 7, dtype=torch.float64)
    E1, g1 = _tiny_problem(k=1).value_and_grad(etas)
    Ek, gk = _tiny_problem(k=k).value_and_grad(etas)
    assert E1 == Ek and torch.equal(g1, gk)


def test_lrs_opt_zero_learning_rates_and_bad_input():
    unroll = _tiny_problem()
    etas = torch.zeros(unroll.T, dtype=torch.float64)
    etas[3] = 0.1
    E, grad = unroll.value_and_grad(etas)
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match=">= 0"):
        unroll.forward(-etas)
    with pytest.raises(ValueError, match="need 7 learning rates"):
        unroll.forward(torch.zeros(3))
    bn = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="without buffers"):
        Unroll(bn, list(bn.parameters()), unroll.x, unroll.y, unroll.batches, unroll.x_val, unroll.y_val)


@pytest.mark.parametrize("method", ["gd", "rms"])
def test_lrs_opt_outer_loop_decreases_E_and_stays_feasible(method):
    unroll = _tiny_problem(T=10)
    result = optimise_schedule(unroll, torch.full((10,), 0.01, dtype=torch.float64), 6, method=method,
                               progress=False)
    E = result.E_history
    assert len(E) >= 4 and all(b <= a for a, b in zip(E, E[1:])) and E[-1] < E[0]
    assert (result.etas >= 0).all() and result.backward_passes == len(E) - 1 + (result.stopped != "")
    with pytest.raises(ValueError, match="method must be one of"):
        optimise_schedule(unroll, result.etas, 1, method="adam", progress=False)


def test_replaying_the_schedule_reproduces_E():
    """The Trainer's LRS-OPT replay (torch.optim.SGD) runs the same maths as the unroll."""
    unroll = _tiny_problem(T=9)
    etas = torch.linspace(0.3, 0.05, 9, dtype=torch.float64)
    E = unroll.forward(etas).E
    model = unroll.model
    with torch.no_grad():
        for p, w in zip(model.parameters(), unroll.w0):
            p.copy_(w)
    trainer = Trainer(MethodSpec("LRS-OPT", {"schedule": etas}), model, Protocol("sgd", lr=0.0))
    log = train_run(trainer, unroll.x, unroll.y, unroll.batches, val_batch=None,
                    evaluator=lambda: evaluate(model, unroll.x_val, unroll.y_val), eval_every=100, progress=False)
    assert log.lrs == pytest.approx(etas.tolist(), rel=0, abs=0)
    assert log.val_loss[-1] == pytest.approx(E, rel=1e-12)


@pytest.mark.parametrize("family,mu", [("HD", 0.0), ("RTHO", 1.0), ("MARTHE", 0.9)])
def test_trainer_maps_families_onto_marthe(family, mu):
    model = mlp(4, [5], 3)
    trainer = Trainer(MethodSpec(family, {"beta": 1e-3, "mu": mu}), model, Protocol("sgdm", lr=0.05))
    assert trainer.opt.mu == mu and trainer.lr == 0.05
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = trainer.step(lambda: torch.nn.functional.cross_entropy(model(x), y),
                        lambda: torch.nn.functional.cross_entropy(model(x[:4]), y[:4]))
    assert math.isfinite(loss) and trainer.lr >= 0
    with pytest.raises(ValueError, match="unknown method family"):
        MethodSpec("Cosine")


def test_extra_marthe_options_pass_through():
    assert cli._key_value("hyper_lr_adapt=1e-6") == ("hyper_lr_adapt", 1e-6)
    assert cli._key_value("hypergrad_norm=rms") == ("hypergrad_norm", "rms")
    assert cli._key_value("max_tangent_ratio=none") == ("max_tangent_ratio", None)
    with pytest.raises(Exception, match="KEY=VALUE"):
        cli._key_value("oops")
    protocol = Protocol("sgd", lr=0.1, marthe_options=(("hyper_lr_adapt", 1e-6),))
    trainer = Trainer(MethodSpec("MARTHE", {"beta": 1e-3, "mu": 0.9}), mlp(4, [5], 3), protocol)
    assert trainer.opt.hyper_lr_adapt == 1e-6


def test_exponential_decays_per_step_or_per_epoch():
    model = mlp(4, [5], 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    per_step = Trainer(MethodSpec("Exponential", {"gamma": 0.5}), model, Protocol("sgd", lr=0.1))
    per_epoch = Trainer(MethodSpec("Exponential", {"gamma": 0.5}), model, Protocol("sgd", lr=0.1), decay_per="epoch")
    for tr in (per_step, per_epoch):
        tr.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert per_step.lr == pytest.approx(0.05) and per_epoch.lr == pytest.approx(0.1)
    per_epoch.end_epoch()
    assert per_epoch.lr == pytest.approx(0.05)


def _check_run(run):
    assert all(v >= 0 and math.isfinite(v) for v in run["lrs"])
    assert run["diverged_at"] is None
    assert all(math.isfinite(v) for v in run["val_loss_curve"])
    assert math.isfinite(run["test_loss"]) and 0.0 <= run["test_acc"] <= 1.0


def test_e1_end_to_end_quick(tmp_path):
    cfg = e1_config("quick", n_train=400, n_val=100, hidden=(16,), steps=24, lrs_iterations=3,
                    mus=(0.0, 0.9, 1.0), betas=(1e-3,), exp_samples=2, eval_every=8)
    results = run_e1(cfg, tmp_path, progress=False)
    for name in ("e1_results.json", "e1_runs.csv", "e1_schedules.csv", "e1_table.md", "e1.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "e1_results.json").read_text())
    assert len(saved["runs"]) == 1 + len(e1_methods(cfg))
    for run in saved["runs"]:
        _check_run(run)
        assert len(run["lrs"]) == cfg.steps
    E = saved["lrs_opt"]["E_history"]
    assert len(E) >= 2 and all(b <= a for a, b in zip(E, E[1:])) and E[-1] < E[0]
    lrs_opt_run = saved["runs"][0]
    assert lrs_opt_run["family"] == "LRS-OPT" and lrs_opt_run["val_loss"] == pytest.approx(E[-1], rel=1e-4)
    table = (tmp_path / "e1_table.md").read_text()
    for family in ("LRS-OPT", "MARTHE", "HD", "RTHO", "Exponential", "Constant"):
        assert f"| {family} |" in table
    assert set(results["best"]) == {"LRS-OPT", "MARTHE", "HD", "RTHO", "Exponential", "Constant"}


def test_e2_end_to_end_quick(tmp_path):
    cfg = e2_config("quick", dataset="digits", n_train=128, n_val=64, n_test=64, width=4, epochs=1,
                    seeds=2, configs=2, batch_size=64, val_batch=32)
    results = run_e2(cfg, tmp_path, progress=False)
    for name in ("e2_results.json", "e2_summary.csv", "e2_table.md", "e2.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = results["summary"]
    expected = {(m, p, family_of(meth, p)) for m in cfg.models for p in cfg.protocols for meth in E2_METHODS}
    assert {(s["model"], s["protocol"], s["family"]) for s in summary} == expected
    table = (tmp_path / "e2_table.md").read_text()
    for _, _, family in expected:
        assert f"| {family} |" in table
    for s in summary:
        if s["status"] != "ok":
            assert availability(s["family"]) == s["status"]
            continue
        assert s["seeds"] == 2 and s["diverged"] == 0
        assert 0.0 <= s["test_acc_mean"] <= 1.0 and s["test_acc_std"] >= 0.0 and s["sec_per_epoch"] > 0
    for run in results["runs"]:
        assert all(v >= 0 and math.isfinite(v) for v in run["lrs"])
        assert len(run["epoch_seconds"]) == cfg.epochs
    json.loads((tmp_path / "e2_results.json").read_text())


def test_e2_search_space_matches_the_paper():
    cfg = e2_config("full", configs=50)
    betas = [c["beta"] for c in sample_configs("MARTHE", "sgdm", "vgg", cfg)]
    mus = [c["mu"] for c in sample_configs("MARTHE", "sgdm", "vgg", cfg)]
    gammas = [c["gamma"] for c in sample_configs("Exponential", "adam", "resnet", cfg)]
    assert all(1e-6 <= b <= 1e-3 for b in betas) and min(betas) < 1e-5 and max(betas) > 1e-4
    assert all(0.9 <= m <= 0.999 for m in mus)
    assert all(0.9 <= g <= 1.0 for g in gammas)
    assert sample_configs("MARTHE", "sgdm", "vgg", cfg) == sample_configs("MARTHE", "sgdm", "vgg", cfg)
    assert sample_configs("SF", "sgdm", "vgg", cfg) == [{}]
    with pytest.raises(ValueError, match="unknown E2 methods"):
        e2_config("quick", methods=("Adagrad",))


@pytest.mark.parametrize("name", ["vgg", "resnet"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnns_take_any_input_size(name, shape):
    model = build_model(name, shape, 10, width=4, blocks=(1, 1))
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_demo_runs_and_reports_every_method(tmp_path):
    rows = run_demo(DemoConfig(steps=40), out=tmp_path, progress=False)
    assert [r["method"].split(" ")[0] for r in rows] == ["Constant", "Constant", "HD", "RTHO", "MARTHE", "MARTHE"]
    assert "safeguards=robust" in rows[-1]["method"] and "safeguards" not in rows[-2]["method"]
    for r in rows:
        assert math.isfinite(r["val_loss"]) and r["final_lr"] >= 0 and r["diverged_at"] is None
    assert (tmp_path / "demo.md").read_text().count("\n") == 2 + len(rows)
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the figure, next to the table
    for r in rows:  # what it draws: the LR at every step, the validation loss along the way
        assert len(r["lrs"]) == 40 and r["eval_steps"][0] == 0 and r["eval_steps"][-1] == 40
        assert len(r["val_loss_curve"]) == len(r["eval_steps"]) > 2


def test_cli(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "20", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for name in ("HD", "RTHO", "MARTHE", "Constant"):
        assert name in out
    assert cli.main(["demo", "--steps", "10", "--dynamics", "adam", "--eta0", "0.001", "--out", str(tmp_path / "a"),
                     "--no-progress"]) == 0
    assert "Digits MLP, adam from eta0 = 0.001" in capsys.readouterr().out
    assert cli.main(["e1", "--quick", "--dataset", "mnist", "--out", str(tmp_path / "e"), "--no-progress"]) == 2
    assert "mnist: no data directory given" in capsys.readouterr().err
    assert cli.main(["e1", "--quick", "--steps", "12", "--hidden", "8", "--lrs-iterations", "1", "--mus", "0.5",
                     "--betas", "1e-3", "--exp-samples", "1", "--n-train", "200", "--n-val", "50",
                     "--out", str(tmp_path / "e1"), "--no-progress"]) == 0
    assert "| MARTHE |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["e2", "--preset", "medium"])
