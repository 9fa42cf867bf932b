"""Step level: one full training step on the paper's MLP, VGG-11 and ResNet-18.

Side by side, in one run and on the same random batches:

* ``plain-*``: a plain torch step (forward + backward + ``torch.optim`` SGD / SGDM / Adam);
* ``autograd-*``: one MARTHE step the pure-autograd way (benchmarks/autograd_baseline.py);
* ``marthe-<dynamics>-<backend>-<hvp>-<hypergrad>``: one ``marthe_ext.Marthe`` step, val
  mode (the validation hypergradient after the update), mu = 0.99. Every backend runs
  with the authors' engines (reverse HVP, full validation gradient); the HVP and
  hypergradient engines are compared on the fastest backend that loads ("fast").

Reported per case: median step time, peak memory above the model and its batches (CUDA
only), and for MARTHE the time per phase of ``step()`` (the NVTX ranges). The ratios
are computed by ``benchmarks/results_table.py``. CPU runs reduce the convolutional
networks (quarter width, batch 8) and run only the headline cases on them
(``CPU_CONV_CASES``); the MLP keeps its size, its batch of 100 and the whole matrix.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import marthe_ext
from benchmarks import harness
from benchmarks.autograd_baseline import AutogradMarthe
from benchmarks.conftest import fast_backend_name, load_or_skip
from benchmarks.models import MODELS, model_spec, num_params, random_batch

pytestmark = pytest.mark.benchmark

LR = {"sgd": 0.01, "sgdm": 0.01, "adam": 1e-3}
MOMENTUM, MU, HYPER_LR = 0.9, 0.99, 1e-6
BACKENDS = ("torch", "triton", "cuda", "cpu")
ENGINE_VARIANTS = (("forward", "grad"), ("fd", "grad"), ("reverse", "jvp"), ("reverse", "fd"),
                   ("forward", "jvp"), ("fd", "fd"))

# The cheaper modes (README "Cheaper steps"): name -> (Marthe options, steps in one period).
# An amortised mode is timed over whole periods (k steps per call, the time divided by k):
# its steps differ, and a median over single steps would report only the cheap ones.
MODES = {
    "first-order": (dict(first_order=True), 1),
    "hvp-every-2": (dict(hvp_every=2), 2),
    "hvp-every-4": (dict(hvp_every=4), 4),
    "hvp-every-8": (dict(hvp_every=8), 8),
    "hypergrad-every-4": (dict(hypergrad_every=4), 4),
}

# (kind, dynamics, backend, hvp, hypergrad, mode)
CASES = (
    [("plain", d, None, None, None, None) for d in ("sgd", "sgdm", "adam")]
    + [("autograd", d, None, "reverse", "grad", None) for d in ("sgdm", "adam")]
    + [("marthe", d, b, "reverse", "grad", None) for d in ("sgdm", "adam") for b in BACKENDS]
    + [("marthe", "sgdm", "fast", h, hg, None) for h, hg in ENGINE_VARIANTS]
    + [("marthe", "sgdm", "fast", "reverse", "grad", m) for m in MODES]
)

# On the CPU a MARTHE step of even the reduced VGG-11 / ResNet-18 takes a large part of a
# second: only these cases run there, so that the whole suite stays within minutes.
CPU_CONV_CASES = {"plain-sgdm", "autograd-sgdm", "marthe-sgdm-torch-reverse-grad",
                  "marthe-sgdm-cpu-reverse-grad"}


def case_id(case) -> str:
    kind, dynamics, backend, hvp, hypergrad, mode = case
    if kind == "plain":
        return f"plain-{dynamics}"
    if kind == "autograd":
        return f"autograd-{dynamics}"
    return f"marthe-{dynamics}-{backend}-{hvp}-{hypergrad}" + (f"-{mode}" if mode else "")


def _plain_step(model, dynamics, closure):
    params = list(model.parameters())
    if dynamics == "adam":
        opt = torch.optim.Adam(params, lr=LR["adam"])
    else:
        opt = torch.optim.SGD(params, lr=LR[dynamics], momentum=MOMENTUM if dynamics == "sgdm" else 0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        closure().backward()
        opt.step()

    return step


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("model_name", MODELS)
def test_step(benchmark, model_name, case, dev):
    kind, dynamics, backend, hvp, hypergrad, mode = case
    reduced = dev.type != "cuda"
    if reduced and model_name != "mlp" and case_id(case) not in CPU_CONV_CASES:
        pytest.skip(f"CPU run: {model_name} runs only {sorted(CPU_CONV_CASES)} "
                    f"(the full matrix runs on a GPU)")
    spec = model_spec(model_name, reduced=reduced)
    backend_name = None
    if kind == "marthe":
        backend_name = fast_backend_name(dev) if backend == "fast" else backend
        load_or_skip(backend_name, dev)

    harness.fresh_memory(dev)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = random_batch(spec, dev, generator=gen)
    xv, yv = random_batch(spec, dev, generator=gen)
    model = spec.build().to(dev)
    base = harness.allocated(dev)  # model + batches: what every variant needs anyway

    def closure():
        return F.cross_entropy(model(x), y)

    def val_closure():
        return F.cross_entropy(model(xv), yv)

    if kind == "plain":
        step = _plain_step(model, dynamics, closure)
    elif kind == "autograd":
        opt = AutogradMarthe(model.parameters(), lr=LR[dynamics], dynamics=dynamics,
                             momentum=MOMENTUM, mu=MU, hyper_lr=HYPER_LR)
        step = lambda: opt.step(closure, val_closure)  # noqa: E731
    else:
        opt = marthe_ext.Marthe(model.parameters(), lr=LR[dynamics], dynamics=dynamics,
                                momentum=MOMENTUM, mu=MU, hyper_lr=HYPER_LR, hvp=hvp,
                                hypergrad=hypergrad, backend=backend_name, model=model,
                                safeguards=None,  # the baseline's algorithm: the same work
                                **(MODES[mode][0] if mode else {}))
        period = MODES[mode][1] if mode else 1

        def step():
            for _ in range(period):
                opt.step(closure, val_closure)
        try:
            step()  # no HVP yet (zero tangent)
            step()  # the first step with an HVP
        except (RuntimeError, NotImplementedError) as exc:
            if (hvp, hypergrad) == ("reverse", "grad"):
                raise  # the authors' engines work for every model: a failure is a bug
            # Forward-mode engines may not support a layer (e.g. BatchNorm in train mode).
            pytest.skip(f"hvp={hvp!r}, hypergrad={hypergrad!r} fails on {model_name}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    benchmark.group = f"step {model_name}"
    benchmark.extra_info.update(
        suite="step", model=model_name, kind=kind, dynamics=dynamics, backend=backend_name,
        hvp=hvp, hypergrad=hypergrad, params=num_params(model), batch=spec.batch,
        reduced=reduced and model_name != "mlp", mode=mode)
    seconds = harness.run(benchmark, step, dev, harness.budget_s(dev, "step"))
    if seconds is None:
        return
    if kind == "marthe" and period > 1:  # time per step, averaged over one period
        benchmark.extra_info.update(steps_per_call=period, time_s=seconds / period)
    benchmark.extra_info["peak_extra_bytes"] = harness.peak_extra_bytes(step, dev, base)
    if kind == "marthe":
        steps = 2 if (reduced or harness.quick()) else 5
        phases = harness.step_breakdown(step, dev, steps=steps)
        benchmark.extra_info["phases_s"] = {k: v / period for k, v in phases.items()}
        benchmark.extra_info["backend"] = opt.backend
        benchmark.extra_info["hvp"] = opt.hvp_engine or hvp
    assert all(torch.isfinite(p).all() for p in list(model.parameters())[:1])
