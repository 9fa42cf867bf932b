"""Registers, spills and global access widths of every Triton kernel, per GPU target,
compiled on a machine without a GPU (benchmarks/triton_aot.py).

    python -m benchmarks.triton_compile_report --cc 90 80 70 --matrix full --jobs 2
    python -m benchmarks.triton_compile_report --from-json out.json   # table only

Prints a markdown section (paste it into benchmarks/RESULTS.md) and, with --json, keeps
the per-specialisation results. Columns: the specialisations compiled; registers per
thread (min-max over them); the largest spill (bytes); the global loads of the
representative unmasked launch (every flag on), as ``width in bytes x count``, for
16-byte-aligned and for misaligned tensors. The pointer- and chunk-table reads are the
8-byte scalar loads in every row.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections import defaultdict
from pathlib import Path

from benchmarks import triton_aot

_FAMILY_FLAGS = {"NESTEROV": "nesterov", "DECOUPLED": "adamw"}
_DT_KEYS = ("W_DT", "A_DT", "X_DT")
_FLAG_KEYS = ("HAS_HZ", "HAS_WD", "HAS_CLIP", "HAS_EXTRA")


def family(row) -> str:
    name = row["kernel"].removeprefix("_").removesuffix("_kernel").removesuffix("_update")
    for flag, label in _FAMILY_FLAGS.items():
        if row["constexprs"].get(flag):
            return label
    return name


def _dtype(row) -> str:
    c = row["constexprs"]
    param = next(c[k] for k in _DT_KEYS if k in c)
    compute = c.get("C_DT") or c.get("ACC_DT") or c.get("F_DT")
    return param if param == compute else f"{param}/{compute}"


def _widths(row) -> str:
    loads = row["widths"]["ld"]
    return " ".join(f"{w}B×{n}" for w, n in sorted(loads.items(), key=lambda x: -int(x[0])))


def _representative(rows, align):
    """The unmasked launch with the most flags on, at the given alignment."""
    pick = [r for r in rows if not r["constexprs"]["MASKED"] and r["constexprs"]["ALIGN"] == align]
    return max(pick, key=lambda r: sum(bool(r["constexprs"].get(k)) for k in _FLAG_KEYS),
               default=None)


def table(rows) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["cc"], family(r), _dtype(r))].append(r)
    order = ["sgd", "sgdm", "nesterov", "adam", "adamw", "clipped_dot", "all_finite"]
    lines = []
    for cc in sorted({r["cc"] for r in rows}, reverse=True):
        lines += [f"\n**sm_{cc}**\n",
                  "| kernel | params/compute | specs | registers | max spill B "
                  "| loads, aligned | loads, misaligned |",
                  "|---|---|---:|---:|---:|---|---|"]
        keys = sorted((k for k in groups if k[0] == cc),
                      key=lambda k: (order.index(k[1]) if k[1] in order else 99, k[2]))
        for key in keys:
            g = groups[key]
            ok = [r for r in g if "error" not in r]
            regs = [r["registers"] for r in ok]
            spill = max((r["spill_bytes"] for r in ok), default=0)
            al, mis = _representative(ok, 16), _representative(ok, 1)
            failed = len(g) - len(ok)
            lines.append(
                f"| {key[1]} | {key[2]} | {len(g)}{f' ({failed} FAILED)' if failed else ''} | "
                f"{min(regs, default=0)}–{max(regs, default=0)} | {spill} | "
                f"{_widths(al) if al else '—'} | {_widths(mis) if mis else '—'} |")
    return "\n".join(lines)


def section(rows, matrix, seconds, cpu, jobs) -> str:
    import triton

    n_bad = sum("error" in r for r in rows)
    targets = ", ".join(f"sm_{cc}" for cc in sorted({r["cc"] for r in rows}, reverse=True))
    head = (f"## Triton kernels compiled for GPUs without a GPU ({datetime.date.today()}, "
            f"triton {triton.__version__}, bundled ptxas)\n\n"
            f"`python -m benchmarks.triton_compile_report --matrix {matrix}`: the real "
            f"TritonBackend launch paths under a stand-in driver (benchmarks/triton_aot.py), "
            f"{len(rows)} specialisations ({matrix} matrix) for {targets}, {n_bad} failed, "
            f"{'' if seconds != seconds else f'{seconds:.0f} s '}with {jobs} processes"
            f"{'' if cpu != cpu else f' ({cpu:.0f} CPU-seconds)'}. "
            f"Registers per thread (launches use 8 warps), spills, and the global loads of the unmasked launch with every flag "
            f"on (bytes × count; the 8-byte scalar loads include the pointer/chunk tables).")
    return head + "\n" + table(rows) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[90, 80, 70])
    ap.add_argument("--matrix", choices=triton_aot.MATRICES, default="full")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", help="keep the per-specialisation results here")
    ap.add_argument("--from-json", help="render a previous run's results instead of compiling")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        seconds = cpu = float("nan")
    else:
        t0, cpu0 = time.perf_counter(), triton_aot.children_cpu_seconds()
        rows = triton_aot.compile_matrix(args.cc, args.matrix, args.jobs)
        seconds = time.perf_counter() - t0
        cpu = triton_aot.children_cpu_seconds() - cpu0
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(section(rows, args.matrix, seconds, cpu, args.jobs))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
