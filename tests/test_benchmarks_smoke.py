"""Smoke tests of benchmarks/: the modules import, the models are the published ones,
the harness and profiling entry points run, and the results-table script turns a
pytest-benchmark JSON into the expected markdown (the benchmarks themselves run with
``pytest benchmarks/ --benchmark-only``, not in CI)."""
import json

import pytest
import torch

import marthe_ext
from benchmarks import (check_backends, compile_hvp, harness, models, profile_kernel, profile_step,
                        results_table, workloads)
from benchmarks import test_bench_kernel, test_bench_step  # noqa: F401  (they must import)


def test_model_sizes_and_shapes():
    assert models.num_params(models.mlp()) == 898_510  # 784-500-500-500-10
    assert models.num_params(models.resnet18()) == 11_173_962  # CIFAR ResNet-18
    for name in models.MODELS:
        spec = models.model_spec(name, reduced=True)
        x, y = models.random_batch(spec, "cpu", batch=2)
        out = spec.build()(x)
        assert out.shape == (2, 10) and y.shape == (2,)
    assert models.model_spec("resnet18").batch == 128
    # The general builders (used by the experiments) on 8x8 single-channel digits.
    for name in ("mlp", "vgg", "resnet"):
        net = models.build_model(name, (1, 8, 8), 10, hidden=(32,), width=8, blocks=(1, 1))
        assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        models.model_spec("alexnet")
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("alexnet", (1, 8, 8), 10)


def test_kernel_buffers_cover_the_size():
    for n in (1, 7, 1 << 16, 100_000_000):
        sizes = workloads.split_sizes(n)
        assert sum(sizes) == n and min(sizes) >= 0
    bufs = workloads.make_buffers("adam", 1000, torch.device("cpu"))
    assert all((v >= 0).all() for v in bufs.state[1])  # Adam's second moment


def test_harness_timing_and_breakdown():
    cpu = torch.device("cpu")
    assert harness.measure(lambda: torch.ones(10).sum(), cpu, 0.01) > 0
    assert harness.peak_extra_bytes(lambda: None, cpu, 0) is None
    model = torch.nn.Linear(4, 2)
    opt = marthe_ext.Marthe(model.parameters(), lr=0.1, dynamics="sgdm", backend="torch")
    x, xv = torch.randn(8, 4), torch.randn(8, 4)
    step = lambda: opt.step(lambda: model(x).pow(2).mean(), lambda: model(xv).pow(2).mean())  # noqa: E731
    step()
    phases = harness.step_breakdown(step, cpu, steps=2)
    assert {"gradient", "hvp", "fused_update", "hypergradient", "other", "total"} <= set(phases)
    assert phases["total"] >= phases["gradient"] + phases["hvp"] > 0


def test_profile_entry_points_run(capsys):
    threads = torch.get_num_threads()  # profile_step sets the CPU thread count
    try:
        assert profile_step.main(["--model", "mlp", "--batch", "4", "--steps", "2", "--warmup",
                                  "1", "--backend", "torch", "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert "median step" in out and "fused_update" in out
        assert profile_step.main(["--model", "vgg11", "--reduced", "--batch", "2", "--steps", "1",
                                  "--warmup", "1", "--optimizer", "autograd", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert profile_kernel.main(["--backend", "torch", "--dynamics", "sgdm", "--numel", "5000",
                                "--time"]) == 0
    assert "% of copy" in capsys.readouterr().out
    assert check_backends.smoke("torch", torch.device("cpu")) == "torch"


def _bench(extra, median):
    return {"name": "case", "extra_info": dict(extra, time_s=median), "stats": {"median": median}}


def _sample_json(path):
    kernel = dict(suite="kernel", dynamics="adam", numel=64 << 20, min_bytes=1, copy_gbps=4000.0)
    step = dict(suite="step", model="resnet18", params=11_173_962, batch=128, reduced=False)
    benchmarks = [
        _bench(dict(kernel, impl="triton", backend="triton", gbps=3800.0, copy_fraction=0.95), 2e-4),
        _bench(dict(kernel, impl="cuda", backend="cuda", gbps=3000.0, copy_fraction=0.75), 3e-4),
        _bench(dict(kernel, impl="autograd", backend="autograd", gbps=900.0, copy_fraction=0.22), 1e-3),
        _bench(dict(step, kind="plain", dynamics="sgdm", backend=None, hvp=None, hypergrad=None,
                    peak_extra_bytes=100 * 2**20), 0.010),
        _bench(dict(step, kind="autograd", dynamics="sgdm", backend=None, hvp="reverse",
                    hypergrad="grad", peak_extra_bytes=460 * 2**20), 0.071),
        _bench(dict(step, kind="marthe", dynamics="sgdm", backend="triton", hvp="reverse",
                    hypergrad="grad", peak_extra_bytes=190 * 2**20,
                    phases_s={"gradient+hvp": 0.025, "fused_update": 0.001,
                              "hypergradient": 0.009, "other": 0.001}), 0.036),
        _bench(dict(step, kind="marthe", dynamics="sgdm", backend="triton", hvp="fd",
                    hypergrad="fd", peak_extra_bytes=150 * 2**20), 0.020),
    ]
    info = {"marthe": {"date": "2026-11-28", "device_name": "NVIDIA H200", "device_type": "cuda",
                       "torch": "2.11.0", "triton": "3.6.0", "python": "3.12.3",
                       "copy_gbps": 4000.0}}
    path.write_text(json.dumps({"machine_info": info, "benchmarks": benchmarks,
                                "datetime": "2026-11-28T00:00:00"}))


def test_results_table_from_sample_json(tmp_path, capsys):
    src, out = tmp_path / "bench.json", tmp_path / "RESULTS.md"
    _sample_json(src)
    assert results_table.main([str(src), "--out", str(out), "--short"]) == 0
    md = out.read_text()
    assert "Date: 2026-11-28. Device: NVIDIA H200" in md
    assert "| adam | 67,108,864 | 200 us · 3800 GB/s · 95% | 300 us · 3000 GB/s · 75% |" in md
    # 36 ms against 10 ms plain and 71 ms pure-autograd; memory 190 / 100 MiB.
    assert "| MARTHE sgdm · triton · hvp=reverse · hypergrad=grad | 36.0 ms | 3.60 | — | 0.51 | 190 | 1.90 |" in md
    # Targets: judged on the exact configuration (the fd one is faster but not counted).
    assert "resnet18: MARTHE sgdm step <= 3.0x plain sgdm | 3.60x" in md
    assert "MISSED (20% over) | 7.1x; pure-autograd here 7.10x |" in md
    assert "fused update triton, >= 64M elements: >= 90% of copy bandwidth | 95%" in md
    assert "fused update cuda" in md and "75% (worst: adam" in md
    assert "25.00 / 1.00 / 9.00 / 1.00" in md  # the phase breakdown of the missed target
    short = capsys.readouterr().out
    assert "MISS" in short and "ok  " in short


def test_compile_investigation_variants_agree_and_tabulate():
    """benchmarks/compile_hvp.py: every eager variant computes the same (g, H Zw) as the
    reverse engine (the compiled ones take minutes to compile on a CPU: GPU check only)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    params = list(model.parameters())
    tangents = [torch.randn_like(p) for p in params]
    fns = compile_hvp.variants(model, x, y, params, tangents)
    reference = fns["reverse"]()
    rows = [dict(compile_hvp.measure(v, fns[v], torch.device("cpu"), reference, rounds=1), model="tiny")
            for v in ("grad", "reverse", "forward", "func")]
    for r in rows[1:]:
        assert r["rel_err_grad"] < 1e-12 and r["rel_err_hvp"] < 1e-12, r
    failing = compile_hvp.measure("broken", lambda: 1 / 0, torch.device("cpu"), reference, rounds=1)
    assert failing["error"].startswith("ZeroDivisionError")
    text = compile_hvp.table(rows + [dict(failing, model="tiny")])
    assert text.count("\n") == 6 and "| tiny | func |" in text and "ZeroDivisionError" in text


def test_compile_investigation_func_variant_handles_batchnorm_in_train_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(27, 3)).double().train()
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    params = list(model.parameters())
    tangents = [torch.randn_like(p) for p in params]
    before = model[1].running_mean.clone()
    fns = compile_hvp.variants(model, x, y, params, tangents)
    g, h = fns["func"]()
    assert torch.equal(model[1].running_mean, before), "the func variant works on copies"
    ref_g, ref_h = fns["reverse"]()
    assert compile_hvp._rel(h, ref_h) < 1e-12 and compile_hvp._rel(g, ref_g) < 1e-12


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_stage(tmp_path):
    """The GPU check's --dry pipeline on the CPU (about 80 s): every stage that can run
    without a GPU passes, so the one prepared command cannot rot between GPU sessions."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, MARTHE_CHECK_BUDGET_S="900")  # dry reserves are 4x the GPU ones
    env.pop("MARTHE_GPU_TESTS", None)
    run = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    table = run.stdout[run.stdout.index("stage "):]
    for stage in ("env", "build", "gpu-tests", "bench-kernel", "bench-mlp", "table", "compile-hvp"):
        assert any(line.split()[:2] == [stage, "ok"] for line in table.splitlines()), (stage, table)
    assert (tmp_path / "gpu_check.log").exists() and (tmp_path / "RESULTS_gpu.md").exists()
