"""Writing results: JSON (strict: non-finite numbers become null), CSV and Markdown tables."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch


def jsonable(obj: Any) -> Any:
    """Tensors to lists, non-finite floats to None, dataclass-like objects left to the caller."""
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: os.PathLike, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(jsonable(obj), f, indent=1, allow_nan=False)
        f.write("\n")


def read_run_log(path: Path) -> dict[str, dict]:
    """The runs a study already logged (one JSON object per line, keyed by ``"key"``), so
    that a study stopped early resumes where it was."""
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                run = json.loads(line)
                done[run["key"]] = run
    return done


def write_csv(path: os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "diverged" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def downsample(values: Sequence[float], max_points: int = 512) -> tuple[list[int], list[float]]:
    """(indices, values) with at most ``max_points`` evenly spaced entries, the last one kept."""
    n = len(values)
    if n <= max_points:
        return list(range(n)), list(values)
    idx = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return idx, [values[i] for i in idx]
