"""Compile marthe_ext's Triton kernels for real GPUs on a machine without one.

Triton compiles to PTX and cubin without a GPU when the active driver reports a target
(/work/shared/docs/FACTS.md, "Compiling the Triton kernels for real GPUs without a GPU").
Here a stand-in driver reports ``GPUTarget("cuda", CC, 32)``, and the real
``TritonBackend`` is driven over CPU tensors with the CUDA launch configuration, through
every path it can launch. Triton's ``jit_cache_hook`` records each specialisation the real
binder produces (signature, constexprs, alignment attributes, options) and stops before
anything compiles or launches; ``JITFunction.preload`` then compiles each distinct one
(a warm-up compile of the same ``ASTSource``: binder, options, compile stages and the
bundled ptxas unchanged). The ptxas log gives registers and spills; the PTX gives the
widths of the global loads and stores.

Not covered: loading the cubin on a device, launch limits, numerical results, bandwidth.

``TRITON_INTERPRET`` must be unset before the kernels are imported, so this runs in its
own processes: ``python -m benchmarks.triton_aot --cc 90 70 --matrix ci --jobs 2 --json
out.json`` (the parent starts ``--jobs`` workers, each compiling every ``jobs``-th
specialisation, and merges their results). tests/test_triton_gpu_compile.py and
benchmarks/triton_compile_report.py use it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"sm_90": 90, "sm_80": 80, "sm_70": 70}

# (dynamics, nesterov) as the optimizer passes them to the backend.
DYNAMICS = (("sgd", False), ("sgdm", False), ("sgdm", True), ("adam", False), ("adamw", False))
# Param dtype -> the state/tangent dtype the optimizer gives it (low precision keeps fp32).
DTYPES = (("float32", "float32"), ("float64", "float64"), ("bfloat16", "float32"),
          ("float16", "float32"))
MATRICES = ("full", "ci")

_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# ld.global[.modifiers][.vN].<type><bits>, modifiers such as .nc or .L1::evict_last
_VEC = re.compile(r"\b(ld|st)\.global(?:\.[A-Za-z0-9_:]+?)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b")


def _stand_in_driver(cc: int):
    """A driver that reports an NVIDIA target and can launch nothing.

    The device index is the compute capability, so that one process keeps one set of
    Triton's per-device caches (binder, backend) per target.
    """
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("the stand-in driver builds no launchers")

        def get_current_target(self):
            return GPUTarget("cuda", cc, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("the stand-in driver runs nothing")

        def get_current_device(self):
            return cc

        def get_current_stream(self, device=None):
            return 0

        def set_current_device(self, device):
            pass

    return StandInDriver()


def _cases(matrix: str):
    """The backend calls to drive: (op, options) dicts. ``ci`` is a covering subset.

    Full: every dynamics x HVP x weight decay x clip x dtype x alignment for the fused
    update, every call shape of the reductions with and without clip. CI: every
    dynamics x dtype x alignment with every flag on, and with every flag off; every
    reduction call shape, each flag of the reductions taking both values.
    Each call covers the masked and the unmasked launch (a tensor with a tail chunk).
    """
    flags = list(itertools.product((True, False), (0.1, 0.0), (0.5, None)))
    for (dyn, nesterov), (p_dt, s_dt), aligned in itertools.product(
            DYNAMICS, DTYPES, (True, False)):
        if matrix == "ci":
            chosen = flags[:1] + flags[-1:]
        else:
            chosen = flags
        for hz, wd, clip in chosen:
            # adamw's decay is decoupled (no HAS_WD): its wd cases collapse into one
            # specialisation, deduplicated by enumerate_specs.
            yield dict(op="update", dynamics=dyn, nesterov=nesterov, hvp=hz, wd=wd, clip=clip,
                       param=p_dt, state=s_dt, aligned=aligned)
    for (p_dt, s_dt), aligned in itertools.product(DTYPES, (True, False)):
        # train-mode hypergradient <clip(g + wd w), Z>, validation <clip(gE), Z>,
        # auto-mu's <clip(gE), clip(g)>; CI pairs each call shape with one clip setting
        shapes = [dict(a=p_dt, b=s_dt, extra=True, clip_b=False),
                  dict(a=p_dt, b=s_dt, extra=False, clip_b=False),
                  dict(a=p_dt, b=p_dt, extra=False, clip_b=True)]
        for i, shape in enumerate(shapes):
            clips = (0.5, None) if matrix == "full" else ((0.5, None, 0.5)[i],)
            for clip in clips:
                yield dict(op="dot", clip=clip, aligned=aligned, **shape)
        yield dict(op="finite", x=p_dt, aligned=aligned)


def _drive(backend, case, chunk):
    """One backend call over CPU tensors shaped to launch the full and the tail kernel."""
    import torch

    from marthe_ext.backends.api import STATE_NAMES, GroupBuffers, GroupOptions, make_coeffs

    n = chunk + 3
    aligned = case["aligned"]

    def t(dtype_name, misalign=False):
        dtype = getattr(torch, dtype_name)
        if misalign and not aligned:
            return torch.zeros(n + 1, dtype=dtype)[1:]  # contiguous, 1 element off 16 bytes
        return torch.zeros(n, dtype=dtype)

    if case["op"] == "update":
        dyn, p_dt, s_dt = case["dynamics"], case["param"], case["state"]
        opts = GroupOptions(dyn, weight_decay=case["wd"], grad_clip=case["clip"],
                            nesterov=case["nesterov"])
        k = len(STATE_NAMES[dyn])
        bufs = GroupBuffers(
            params=[t(p_dt, misalign=True)], grads=[t(p_dt)],
            hvps=[t(p_dt)] if case["hvp"] else None, tangents=[t(s_dt)],
            state=tuple([t(s_dt)] for _ in range(k)),
            state_tangents=tuple([t(s_dt)] for _ in range(k)))
        f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        coeffs = make_coeffs(eta=f64(0.1), mu=f64(0.9), lr_scale=1.0, step=f64(1.0),
                             opts=opts, ok=torch.tensor(True))
        backend.fused_update_(opts, bufs, coeffs)
    elif case["op"] == "dot":
        backend.clipped_dot([t(case["a"], misalign=True)], [t(case["b"])], clip=case["clip"],
                            a_extra=[t(case["a"])] if case["extra"] else None,
                            a_extra_scale=0.1 if case["extra"] else 0.0,
                            clip_b=case["clip_b"])
    else:
        backend.all_finite([[t(case["x"], misalign=True)]])


def enumerate_specs(cc: int, matrix: str) -> list[dict]:
    """Every distinct specialisation the backend launches for ``matrix`` on target ``cc``,
    in a fixed order: dicts with the kernel's name, its constexprs and Triton's
    serialised specialisation data."""
    import torch
    from triton import knobs
    from triton.runtime import driver

    from marthe_ext.backends.triton_backend import TritonBackend, default_config

    specs: dict[str, dict] = {}
    kernels = {}

    def record(*, key, repr, fn, compile, **_):
        data = compile["specialization_data"]
        kernels[fn.name] = fn.jit_function
        specs.setdefault(data, dict(kernel=fn.name, repr=repr, data=data))
        return True  # skip the compile: this pass only collects

    cfg = default_config(torch.device("cuda"))
    backend = TritonBackend(config=cfg)
    driver.set_active(_stand_in_driver(cc))
    knobs.runtime.jit_cache_hook = record
    try:
        for case in _cases(matrix):
            _drive(backend, case, cfg.chunk)
    finally:
        # The stand-in stays active: without a GPU there is no default driver to restore.
        knobs.runtime.jit_cache_hook = None
    out = sorted(specs.values(), key=lambda s: (s["kernel"], s["data"]))
    for s in out:
        s["fn"] = kernels[s["kernel"]]
        s["constexprs"] = _constexprs(s["data"])
    return out


def _constexprs(data: str) -> dict:
    """The named constexpr arguments (dtypes, flags, block sizes) of a specialisation."""
    obj = json.loads(data)
    names = list(obj["signature"])
    out = {}
    for key, val in zip(obj["constant_keys"], obj["constant_vals"]):
        if len(key) == 1 and obj["signature"].get(names[key[0]]) == "constexpr":
            out[names[key[0]]] = val["constexpr"] if isinstance(val, dict) else val
    return out


def vector_widths(ptx: str) -> dict:
    """Counts of global loads and stores by access width in bytes, e.g.
    {"ld": {"16": 8}} (string keys: the results travel as JSON)."""
    out: dict[str, dict[str, int]] = {"ld": {}, "st": {}}
    for op, vec, bits in _VEC.findall(ptx):
        width = str(int(vec or 1) * int(bits) // 8)
        out[op][width] = out[op].get(width, 0) + 1
    return out


def compile_spec(spec: dict, cc: int) -> dict:
    """Compile one specialisation for ``cc``: registers, spills, access widths, seconds."""
    from triton.runtime import driver

    driver.set_active(_stand_in_driver(cc))
    log = io.StringIO()
    t0 = time.perf_counter()
    result = dict(kernel=spec["kernel"], cc=cc, constexprs=spec["constexprs"])
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v
            kernel = spec["fn"].preload(spec["data"])
    except Exception as e:  # every failure is a result: the caller reports them all
        result.update(error=f"{type(e).__name__}: {e}"[:4000])
        return result
    finally:
        result["seconds"] = round(time.perf_counter() - t0, 3)
    text = log.getvalue()
    regs = [int(x) for x in _PTXAS.findall(text)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(text)]
    if not regs or "cubin" not in kernel.asm:
        result.update(error=f"no cubin or no ptxas report (is the Triton cache warm?):\n{text}")
        return result
    result.update(registers=max(regs), spill_bytes=max(spills, default=0),
                  widths=vector_widths(kernel.asm["ptx"]), cubin_bytes=len(kernel.asm["cubin"]))
    return result


def _worker(ccs, matrix, shard, shards, out_path):
    rows = []
    for cc in ccs:
        for i, spec in enumerate(enumerate_specs(cc, matrix)):
            if i % shards == shard:
                rows.append(compile_spec(spec, cc))
    Path(out_path).write_text(json.dumps(rows))


def compile_matrix(ccs, matrix: str = "ci", jobs: int = 2, timeout: float = 1800) -> list[dict]:
    """Compile every specialisation of ``matrix`` for each target in ``ccs``, in ``jobs``
    fresh processes (TRITON_INTERPRET unset, an empty Triton cache so that ptxas runs);
    the merged per-kernel results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="marthe-aot-") as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        procs = []
        for shard in range(jobs):
            out = os.path.join(tmp, f"shard{shard}.json")
            cmd = [sys.executable, "-m", "benchmarks.triton_aot", "--worker", str(shard),
                   "--jobs", str(jobs), "--matrix", matrix, "--json", out,
                   "--cc", *map(str, ccs)]
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True), out))
        rows, failures = [], []
        deadline = time.monotonic() + timeout
        for proc, out in procs:
            try:
                log, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p, _ in procs:
                    p.kill()
                raise
            if proc.returncode != 0:
                failures.append(log[-4000:])
            else:
                rows += json.loads(Path(out).read_text())
        if failures:
            raise RuntimeError("a compile worker failed:\n" + "\n---\n".join(failures))
    return sorted(rows, key=lambda r: (-r["cc"], r["kernel"], json.dumps(r["constexprs"])))


def children_cpu_seconds() -> float:
    """CPU time of the finished child processes (workers and their ptxas runs) so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[90, 70])
    ap.add_argument("--matrix", choices=MATRICES, default="ci")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", required=True, help="where to write the per-kernel results")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        _worker(args.cc, args.matrix, args.worker, args.jobs, args.json)
        return
    t0, cpu0 = time.perf_counter(), children_cpu_seconds()
    rows = compile_matrix(args.cc, args.matrix, args.jobs)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if "error" in r]
    print(f"{len(rows)} specialisations, {len(bad)} failed, {time.perf_counter() - t0:.0f} s "
          f"with {args.jobs} jobs, {children_cpu_seconds() - cpu0:.0f} CPU-seconds")


if __name__ == "__main__":
    main()
