"""``compile_lr_update=True``: the LR update compiled into one function equals the reference
(``controller.lr_update_`` run op by op) to float64 rounding, for configurations that
together take every branch of every safeguard, skipped steps included."""
from __future__ import annotations

import math

import pytest
import torch

import marthe_ext
from marthe_ext.config import MartheConfig
from marthe_ext.controller import HyperController

pytestmark = pytest.mark.slow  # each configuration compiles once: ~10 s on 2 busy cores

BASE = dict(lr=0.01, dynamics="sgd", momentum=0.9, nesterov=False, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=0.0, mu=0.9, hyper_lr=None, hyper_lr_adapt=0.0, grad_clip=None, hvp="reverse",
            hypergrad="grad", backend="torch", max_lr_change=None, max_lr_growth=None, hypergrad_norm=None,
            hypergrad_norm_decay=0.99, max_tangent_ratio=None, hyper_lr_rprop=None,
            hyper_lr_bounds=(1e-6, 0.1), safeguards=None, has_model=False)
# Together: no normalisation / "rms" / "rms-log"; (a) and (a') on and off; (d) rprop; alpha;
# (e) the loss trust region; (f) the decay trend (a low z, so that it passes on these h), of
# the normalised h and of its sign.
CONFIGS = {
    "paper+alpha": dict(hyper_lr=1e-3, hyper_lr_adapt=1e-2),
    "rms+change": dict(hypergrad_norm="rms", max_lr_change=1.5, hyper_lr=1e-3),
    "robust+change": dict(safeguards="robust", max_lr_change=1.3),
    "robust+trust": dict(safeguards="robust", loss_trust=0.2),
    "robust+trend": dict(safeguards="robust", decay_trend=0.5),
    "robust+trend-sign": dict(safeguards="robust", decay_trend=0.5, decay_trend_test="sign"),
}


def _hypergradients(n=60):
    """(h, ok, loss): signs, magnitudes over 12 decades, zeros, non-finite values on skipped
    steps; a loss that falls, rises past (e)'s band and falls again, sometimes unseen (None)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        h = float(torch.randn((), generator=gen, dtype=torch.float64))
        h *= 10.0 ** float(torch.randint(-6, 6, (), generator=gen))
        ok = i % 9 != 4
        if i % 13 == 5:
            h = 0.0
        if i % 17 == 8:
            h, ok = math.nan, False  # the protocol marks a non-finite h as a skipped step
        loss = None if i % 11 == 3 else 1.0 / (1 + i) + (2.0 if 20 <= i < 35 else 0.0)
        out.append((h, ok, loss))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_lr_update_equals_the_reference(name):
    opts = {**BASE, **CONFIGS[name]}
    ref = HyperController(MartheConfig.from_arguments(**opts), torch.device("cpu"))
    fused = HyperController(MartheConfig.from_arguments(**opts, compile_lr_update=True), torch.device("cpu"))
    assert fused._compiled_lr_update is not None
    etas, split = [], 0
    for h, ok, loss in _hypergradients():
        h_t, ok_t = torch.tensor(h, dtype=torch.float64), torch.tensor(ok)
        loss_t = None if loss is None else torch.tensor(loss, dtype=torch.float32)
        ref.update_lr(h_t, ok_t, loss_t)
        fused.update_lr(h_t, ok_t, loss_t)
        for key, want in ref.scalars.items():
            torch.testing.assert_close(fused.scalars[key], want, rtol=1e-13, atol=0.0, equal_nan=True,
                                       msg=f"{key} after h={h}, ok={ok}")
        etas.append(float(ref.scalars["eta"]))
        split += float(ref.scalars["beta_down"]) != float(ref.scalars["beta"])
    assert len(set(etas)) > 20, "the LR must actually move in this test"
    if "decay_trend" in CONFIGS[name]:
        assert split > 5, "(f)'s own decrease step must act in this test"


def test_optimizer_with_compiled_lr_update_equals_eager():
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        opt = marthe_ext.Marthe(model.parameters(), lr=0.05, backend="torch", compile_lr_update=compiled)
        lrs = []
        for _ in range(12):
            opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y),
                     val_closure=lambda: torch.nn.functional.cross_entropy(model(x[:8]), y[:8]))
            lrs.append(opt.lr)
        runs.append((lrs, torch.cat([p.detach().reshape(-1) for p in model.parameters()])))
    assert len(set(runs[0][0])) > 5
    torch.testing.assert_close(torch.tensor(runs[1][0]), torch.tensor(runs[0][0]), rtol=1e-13, atol=0.0)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-6, atol=1e-7)


def test_compile_lr_update_must_be_a_bool():
    with pytest.raises(TypeError, match="compile_lr_update must be a bool"):
        marthe_ext.Marthe(torch.nn.Linear(2, 2).parameters(), compile_lr_update=1)
