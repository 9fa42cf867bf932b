"""Soak, short: a few hundred MARTHE steps on the CPU leave nothing behind.

benchmarks/soak.py checks, after a warm-up: resident memory flat (growth < 1 %), no
autograd graph alive across steps (weak references to every activation), no grad_fn on
weights, state or hyper-scalars, the Triton backend's chunk tables no longer built and
its pointer-row cache within capacity, eta finite. The 10,000-step run is
``python -m benchmarks.soak --steps 10000`` (its result is in the README).
"""
import gc

import pytest
import torch
from torch import nn

from benchmarks import soak


@pytest.mark.parametrize("safeguards", ["robust", None], ids=["robust", "faithful"])
def test_short_soak_on_the_default_backend(one_thread, safeguards):
    result = soak.soak(200, safeguards, warmup=50, samples=15)
    assert soak.check(result) == [], result
    assert result["skipped_steps"] == 0 and result["eta_last"] != result["eta_first"], result


@pytest.mark.triton
def test_short_soak_triton_tables_stop_growing(one_thread):
    result = soak.soak(16, "robust", backend="triton", warmup=4, samples=4)
    assert result["backend"] == "triton"
    assert result["tables_at_warmup"]["static"] > 0 and result["rows_max"] > 0
    assert soak.check(result) == [], result


def test_graph_tracker_sees_a_graph_kept_alive():
    """The leak detector itself: a loss kept across steps keeps its activations alive."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    tracker = soak.GraphTracker(model)
    kept = model(torch.randn(2, 4)).sum()
    gc.collect()
    assert tracker.alive() > 0
    del kept
    gc.collect()
    assert tracker.alive() == 0
    tracker.close()


def test_check_reports_every_failure():
    bad = dict(rss_growth=0.02, activations_alive=3, tensors_with_grad_fn=1,
               tables_at_warmup=dict(static=2, rows=3, capacity=4), rows_max=5,
               tables_at_end=dict(static=3, rows=5, capacity=4), eta_finite=False,
               eta_last=float("nan"))
    assert len(soak.check(bad)) == 6
