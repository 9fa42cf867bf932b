"""The Triton kernels compile for real GPUs (sm_90, sm_70), on a machine without one.

benchmarks/triton_aot.py drives the real TritonBackend with the CUDA launch configuration
over CPU tensors, under a stand-in driver that reports the target, and compiles every
specialisation it launches to PTX and cubin with Triton's bundled ptxas (in fresh
processes: TRITON_INTERPRET must be unset before the kernels are imported). CI compiles
a covering subset: every dynamics x param dtype x alignment with all flags on and with
all off, every reduction call shape with each of its flags both ways, masked and unmasked
launches: 224 specialisations per target, 448 in all, 129 CPU-seconds (about 65 s on two
idle cores; 202 s measured on the shared, overloaded 2-core machine, 2026-12-01). The
full matrix, every flag combination (680 per target, about 3 times the CPU time), runs
with ``MARTHE_AOT_MATRIX=full pytest tests/test_triton_gpu_compile.py``, or as
``python -m benchmarks.triton_compile_report --matrix full --cc 90 80 70`` (the table of
benchmarks/RESULTS.md).

Fails on any compile error, on register spills in the float32-compute paths, and when
the aligned float32 update no longer uses 16-byte vector accesses.
"""
import itertools
import os

import pytest

from benchmarks import triton_aot

pytest.importorskip("triton")

pytestmark = [pytest.mark.triton, pytest.mark.slow]

TARGETS = (90, 70)
MATRIX = os.environ.get("MARTHE_AOT_MATRIX", "ci")
JOBS = max(1, min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def compiled():
    return triton_aot.compile_matrix(TARGETS, MATRIX, jobs=JOBS)


def _fp32_compute(row):
    c = row["constexprs"]
    return (c.get("C_DT") or c.get("ACC_DT") or c.get("F_DT")) == "fp32"


def test_every_specialisation_compiles(compiled):
    failed = [f"sm_{r['cc']} {r['kernel']} {r['constexprs']}:\n{r['error']}"
              for r in compiled if "error" in r]
    assert not failed, f"{len(failed)} of {len(compiled)} failed; first:\n{failed[0]}"
    assert all(r["cubin_bytes"] > 0 and r["registers"] > 0 for r in compiled)


def test_no_spills_in_fp32_paths(compiled):
    spilled = [(r["cc"], r["kernel"], r["spill_bytes"], r["constexprs"]) for r in compiled
               if _fp32_compute(r) and r.get("spill_bytes", 0) > 0]
    assert not spilled, spilled


def test_matrix_covers_every_launch_variant(compiled):
    """The subset is covering: per target, every dynamics x param dtype x alignment x
    masking for the update, both values of every flag, every reduction dtype."""
    for cc in TARGETS:
        rows = [r["constexprs"] | {"kernel": r["kernel"]} for r in compiled if r["cc"] == cc]
        seen = {(r["kernel"], r.get("NESTEROV"), r.get("DECOUPLED"), r["W_DT"], r["C_DT"],
                 r["ALIGN"], r["MASKED"]) for r in rows if r["kernel"].endswith("_update_kernel")}
        kernels = [("_sgd_update_kernel", None, None), ("_sgdm_update_kernel", False, None),
                   ("_sgdm_update_kernel", True, None), ("_adam_update_kernel", None, False),
                   ("_adam_update_kernel", None, True)]
        dtypes = [("fp32", "fp32"), ("fp64", "fp64"), ("bf16", "fp32"), ("fp16", "fp32")]
        want = {(k, n, d, w, c, a, m) for (k, n, d), (w, c), a, m in itertools.product(
            kernels, dtypes, (1, 16), (False, True))}
        assert want <= seen, sorted(want - seen)[:5]
        for flag in ("HAS_HZ", "HAS_WD", "HAS_CLIP"):
            assert {r[flag] for r in rows if flag in r and "W_DT" in r} == {False, True}, flag
        for kernel, key in (("_clipped_dot_kernel", "A_DT"), ("_all_finite_kernel", "X_DT")):
            assert {r[key] for r in rows if r["kernel"] == kernel} == {
                "fp32", "fp64", "bf16", "fp16"}, kernel


def test_aligned_fp32_update_uses_16_byte_vectors(compiled):
    """launch config's promise (triton_backend.default_config): one 16-byte vector per
    thread per float32 buffer in the unmasked, aligned launch; none when misaligned."""
    for r in compiled:
        c = r["constexprs"]
        if not r["kernel"].endswith("_update_kernel") or c["W_DT"] != "fp32":
            continue
        loads = r["widths"]["ld"]
        if c["ALIGN"] == 16 and not c["MASKED"]:
            assert loads.get("16", 0) > 0, (r["cc"], r["kernel"], c, loads)
        if c["ALIGN"] == 1:
            assert not loads.get("16", 0), (r["cc"], r["kernel"], c, loads)
