"""``python/run.py e1`` and ``e2`` under torchrun: 2 gloo processes on 127.0.0.1 against one.

Each rank trains on its half of every batch; every method (torch.optim baselines through
DDP, schedule-free and Prodigy through DDP, MARTHE through its own averaging) must train
the same model on both ranks -- the runs check that themselves (``parallel.check_agree``
fails a run whose ranks ended apart) -- and rank 0 alone writes the results.

* E1 (an MLP, no BatchNorm) equals one process on the global batch up to float32 rounding:
  the printed table is identical but for the timing column, and every run's final losses
  and accuracies agree within 1e-6 relative (measured: 2e-9; LR curves bit-identical).
* E2's CNNs have BatchNorm, which normalises each rank's half batch with its own
  statistics (as with DDP), so 2 ranks are not one process there: the table has the same
  rows and chosen configurations, and the runs' LR curves stay within 1e-3 relative over
  the few steps of this tiny configuration.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "python" / "run.py"
TIMEOUT_S = 240  # one launch takes ~10 s on a busy 2-core machine

E1 = ["e1", "--quick", "--steps", "12", "--hidden", "8", "--lrs-iterations", "1", "--mus", "0.5",
      "--betas", "1e-3", "--exp-samples", "1", "--n-train", "200", "--n-val", "50", "--eval-every", "6"]
E2 = ["e2", "--quick", "--dataset", "digits", "--models", "vgg", "--protocols", "sgdm",
      "--methods", "Exponential,MARTHE,SF,Prodigy", "--epochs", "1", "--configs", "1", "--seeds", "1",
      "--n-train", "128", "--n-val", "64", "--n-test", "64", "--width", "4", "--batch-size", "64",
      "--val-batch", "32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list, out: Path, nproc: int) -> str:
    """stdout of ``run.py args`` in one process or under torchrun; killed (its whole session,
    torchrun's workers included) after TIMEOUT_S."""
    script = [str(RUN), *args, "--out", str(out), "--no-progress", "--threads", "1"]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:  # a static rendezvous on 127.0.0.1 (torchrun --standalone would bind localhost)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *script]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(args[:1])} on {nproc} process(es) did not finish in {TIMEOUT_S} s")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return stdout


def table_rows(stdout: str, drop_last: int = 1) -> list[list[str]]:
    """The printed Markdown table's cells, less its last ``drop_last`` columns (timings)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("|")]
    assert len(rows) > 2, stdout
    return [r[:len(r) - drop_last] for r in rows]


def runs(out: Path, name: str) -> list[dict]:
    return json.loads((out / f"{name}_results.json").read_text())["runs"]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare(args: list, tmp_path: Path):
    one = launch(args, tmp_path / "one", 1)
    two = launch(args, tmp_path / "two", 2)
    name = args[0]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())
    return one, two, runs(tmp_path / "one", name), runs(tmp_path / "two", name)


def test_e1_two_ranks_equal_one_process(tmp_path):
    one, two, runs1, runs2 = compare(E1, tmp_path)
    assert table_rows(two) == table_rows(one)
    families = {r["family"] for r in runs2}
    assert families == {"LRS-OPT", "MARTHE", "Exponential", "Constant"}
    assert [r["label"] for r in runs2] == [r["label"] for r in runs1]
    for r1, r2 in zip(runs1, runs2):
        for key in ("val_loss", "test_loss", "val_acc", "test_acc", "final_lr"):
            assert rel(r1[key], r2[key]) <= 1e-6, (r1["label"], key, r1[key], r2[key])
        assert max(rel(a, b) for a, b in zip(r1["lrs"], r2["lrs"])) <= 1e-6, r1["label"]
    marthe = next(r for r in runs2 if r["family"] == "MARTHE")
    assert marthe["final_lr"] != 0.01  # the hypergradient moved eta: the comparison is not vacuous


def test_e2_two_ranks_match_one_process_but_batchnorm(tmp_path):
    one, two, runs1, runs2 = compare(E2, tmp_path)
    # model, protocol, method, chosen configuration | ... | seeds (diverged), skipped steps
    pick = (0, 1, 2, 3, 6, 7)
    assert [[r[i] for i in pick] for r in table_rows(two)] == [[r[i] for i in pick] for r in table_rows(one)]
    assert {r["family"] for r in runs2} >= {"Exponential", "MARTHE"}
    for r1, r2 in zip(runs1, runs2):
        assert r1["label"] == r2["label"] and r2["diverged_at"] is None
        assert max(rel(a, b) for a, b in zip(r1["lrs"], r2["lrs"])) <= 1e-3, r1["label"]
