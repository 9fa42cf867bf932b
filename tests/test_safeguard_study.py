"""The safeguard study (python/marthe_experiments/safeguard_study.py) end to end on tiny data."""
import csv
import json
import math

import pytest

from marthe_experiments import safeguard_study as study

pytestmark = [pytest.mark.filterwarnings("ignore:marthe_ext. no fast backend"),
              pytest.mark.usefixtures("one_thread")]


def test_quick_study_end_to_end(tmp_path):
    out, figure = tmp_path / "study", tmp_path / "fig" / "heat.png"
    assert study.main(["--out", str(out), "--quick", "--no-progress", "--figure", str(figure)]) == 0
    cfg = study.StudyConfig(**study.QUICK)
    cells = len(cfg.mus) * len(cfg.betas) * len(cfg.seeds)

    results = json.loads((out / "safeguard_results.json").read_text())
    runs = results["runs"]
    assert len(runs) == cells * len(study.DEFAULT_VARIANTS)
    e0 = runs[0]["E0"]
    assert abs(e0 - math.log(10)) < 0.3  # a random 10-class network starts near ln 10
    for r in runs:
        assert r["diverged"] == (r["reason"] is not None)
        if not r["diverged"]:
            assert r["E"] is not None and 0 < r["E"] <= e0 and r["skipped_steps"] == 0
            assert r["min_lr"] >= 0
        if r["E"] is None:
            assert r["diverged"]

    # Only the faithful algorithm (and the tangent cap, which does not bound eta) may diverge;
    # rms-log keeps eta > 0 and the LR-change bound keeps it within a factor rho per step.
    by_variant = {row["variant"]: row for row in results["summary"]}
    assert set(by_variant) == set(study.DEFAULT_VARIANTS)
    for v in ("rms-log", "lr-change"):
        assert all(r["min_lr"] > 0 for r in runs if r["variant"] == v)
    # On the quick grid the faithful algorithm diverges (mu 0.99, beta 0.1: E ends above E0)
    # and the eta-bounding safeguards do not: the study shows the difference it is about.
    assert by_variant["faithful"]["diverged"] >= 1
    assert by_variant["rms-log"]["diverged"] == by_variant["lr-change"]["diverged"] == 0
    for v, row in by_variant.items():
        assert row["runs"] == cells
        assert row["diverged"] == sum(r["diverged"] for r in runs if r["variant"] == v), v
        if math.isfinite(row["best_E"] or math.inf):
            assert row["median_E"] is None or row["median_E"] >= row["best_E"] - 1e-12

    # Cells where a safeguard provably never acts reuse the run it equals.
    reused = [r for r in runs if r.get("reused_from")]
    assert {r["reused_from"] for r in reused} <= {"rms-log", "faithful"}
    assert any(r["reused_from"] == "rms-log" for r in reused)
    source = {(r["variant"], r["mu"], r["beta"], r["seed"]): r for r in runs if not r.get("reused_from")}
    for r in reused:
        twin = source[(r["reused_from"], r["mu"], r["beta"], r["seed"])]
        assert r["lrs"] == twin["lrs"] and r["E"] == twin["E"]
        if r["reused_from"] == "rms-log":
            assert r["beta"] / math.sqrt(1 - 0.99) < math.log(1.1)
        elif r["variant"] == "lr-change":
            assert (twin["max_log_lr_step"] or math.inf) < math.log(1.1)
        else:
            assert r["variant"] == "tangent-cap" and (twin["max_tangent_norm_ratio"] or math.inf) < 100.0

    lines = (out / "safeguard_runs.jsonl").read_text().splitlines()
    assert len(lines) == len(runs) - len(reused)
    with open(out / "safeguard_runs.csv") as f:
        assert len(list(csv.reader(f))) == len(runs) + 1
    table = (out / "safeguard_table.md").read_text()
    for v in study.DEFAULT_VARIANTS:
        line = next(line for line in table.splitlines() if line.startswith(f"| {v} |"))
        assert f"| {by_variant[v]['diverged']} / {cells} |" in line
    for png in (out / "safeguard_heatmap.png", figure):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1_000 < len(data) < 300_000

    # A second call finds every run done and only rewrites the outputs.
    assert study.main(["--out", str(out), "--quick", "--no-progress"]) == 0
    assert len((out / "safeguard_runs.jsonl").read_text().splitlines()) == len(lines)


def test_reuse_is_exact():
    """A run the faithful run proves identical (safeguards never triggered) is identical."""
    cfg = study.StudyConfig(**{**study.QUICK, "steps": 12})
    faithful = study.run_one(cfg, "faithful", 0.99, 1e-3, 0)
    for variant in ("lr-change", "tangent-cap"):
        assert study.reused_from_faithful(variant, faithful)
        direct = study.run_one(cfg, variant, 0.99, 1e-3, 0)
        assert direct["lrs"] == faithful["lrs"] and direct["E"] == faithful["E"]
    assert not study.reused_from_faithful("rms-log", faithful)
    assert not study.reused_from_faithful("lr-change", dict(faithful, max_log_lr_step=math.log(1.2)))
    assert not study.reused_from_faithful("tangent-cap", dict(faithful, max_tangent_norm_ratio=None))


def test_divergence_verdicts():
    cfg = study.StudyConfig(**{**study.QUICK, "steps": 5, "mus": (1.0,), "betas": (1e-1,)})
    faithful = study.run_one(cfg, "faithful", 1.0, 1e3, 0)  # beta far too large: eta explodes
    assert faithful["diverged"] and faithful["reason"] in (
        "skipped step", "non-finite training loss", "non-finite E", "E above the initial loss")
    safe = study.run_one(cfg, "lr-change", 1.0, 1e3, 0)
    assert not safe["diverged"]
    assert safe["max_lr"] <= cfg.eta0 * 1.1 ** cfg.steps * (1 + 1e-9)


def test_rejects_another_problem_in_the_same_directory(tmp_path):
    out = tmp_path / "s"
    study.main(["--out", str(out), "--quick", "--no-progress", "--variants", "faithful", "--betas", "1e-3",
                "--mus", "0"])
    with pytest.raises(SystemExit):
        study.main(["--out", str(out), "--quick", "--no-progress", "--steps", "7", "--variants", "faithful"])


def test_the_studied_default_is_the_library_default():
    """The README's claim: the variant "robust-2" (issue 15's study's default) is Marthe's
    default preset; until 2026-12-01 it was "rms-log+growth+rprop"."""
    import torch

    import marthe_ext

    w = [torch.nn.Parameter(torch.zeros(2))]
    studied = marthe_ext.Marthe(w, safeguards=None, **study.VARIANTS["robust-2"])
    default = marthe_ext.Marthe(w)
    keys = ("hypergrad_norm", "hypergrad_norm_decay", "max_lr_growth", "max_lr_change", "max_tangent_ratio",
            "hyper_lr_rprop", "hyper_lr_bounds", "loss_trust")
    assert {k: getattr(studied, k) for k in keys} == {k: getattr(default, k) for k in keys}
    assert study.VARIANTS["rprop-beta-max-1"]["hyper_lr_bounds"] == (1e-6, 1.0)
