"""Crash-safe resume: SIGKILL at random steps, then resume, ends bit-identical (CPU) to an
uninterrupted run; bad checkpoints raise CheckpointError and change nothing; Marthe's
state dict loads with ``weights_only=True``.

The training script is python/examples/resumable_training.py (a checkpoint every step,
written atomically by marthe_ext.checkpoint), run in subprocesses.
"""
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import marthe_ext
from marthe_ext import checkpoint
from marthe_ext.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "python" / "examples" / "resumable_training.py"
STEPS = 50
# Every kill leaves at least this many steps to run (each with its checkpoint write, some
# 10-20 ms), so that the kill lands long before the script could finish on its own.
MARGIN = 20
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _run(ckpt, out, kill_after=None, timeout=120):
    """Run the script; with ``kill_after`` SIGKILL it once it has printed that step.

    A watchdog kills it after ``timeout`` seconds whatever happens (the test then fails)."""
    cmd = [sys.executable, str(SCRIPT), "--steps", str(STEPS), "--ckpt", str(ckpt),
           "--out", str(out)]
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True)
        expired = threading.Event()
        watchdog = threading.Timer(timeout, lambda: (expired.set(), proc.kill()))
        watchdog.start()
        try:
            killed = False
            for line in proc.stdout:
                if kill_after is not None and line.strip() == f"step {kill_after}":
                    proc.send_signal(signal.SIGKILL)  # lands wherever the next step has got to
                    killed = True
                    break
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        assert not expired.is_set(), f"the script ran over {timeout} s: {err.read()[-2000:]}"
        if kill_after is None:
            assert proc.returncode == 0, err.read()[-2000:]
        else:
            assert killed, f"the script never printed step {kill_after}: {err.read()[-2000:]}"
            assert proc.returncode == -signal.SIGKILL, "the script finished before the kill"
        return proc.returncode


def _flat(obj, prefix=""):
    """Every tensor and value of a (nested) checkpoint, keyed by its path."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def _assert_identical(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), k
        else:
            assert x == y, k


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """Two kills at random steps (seeded; the kill lands wherever the next step, or its
    checkpoint write, has got to), two resumes, against one uninterrupted run."""
    rng = random.Random(2026)
    _run(tmp_path / "ref-last.pt", tmp_path / "ref.pt")
    first = rng.randrange(2, STEPS - MARGIN - 8)
    second = rng.randrange(first + 3, STEPS - MARGIN)
    ckpt, out = tmp_path / "last.pt", tmp_path / "final.pt"
    assert _run(ckpt, out, kill_after=first) == -signal.SIGKILL
    early = checkpoint.read(ckpt)
    assert first <= early["step"] < STEPS
    assert _run(ckpt, out, kill_after=second) == -signal.SIGKILL
    assert not out.exists()
    _run(ckpt, out)
    ref, got = checkpoint.read(tmp_path / "ref.pt"), checkpoint.read(out)
    assert got["step"] == STEPS
    _assert_identical(ref, got)
    # the resumed runs really trained: the weights moved after the first kill
    assert not torch.equal(early["model"]["0.weight"], got["model"]["0.weight"])


def _build(dynamics="sgdm", **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, marthe_ext.Marthe(model.parameters(), lr=0.05, dynamics=dynamics, **kw)


def _train(model, opt, steps=3):
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
        opt.step(loss, val_closure=loss)


def _snapshot(model, opt):
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": _flat(opt.state_dict()),
            "lr": opt.lr}


def _assert_unchanged(before, model, opt):
    _assert_identical(before["model"], model.state_dict())
    after = _flat(opt.state_dict())
    assert before["opt"].keys() == after.keys()
    for k, v in before["opt"].items():
        assert (torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]), k
    assert opt.lr == before["lr"]


@pytest.fixture
def saved(tmp_path):
    model, opt = _build("adam")
    _train(model, opt)
    path = tmp_path / "good.pt"
    checkpoint.save(path, model=model, optimizer=opt, step=3, note="ok")
    return path


@pytest.fixture
def target():
    """A different model/optimizer state to load into: it must not change on failure."""
    model, opt = _build("adam")
    _train(model, opt, steps=1)
    return model, opt


def test_good_checkpoint_round_trips(saved, target):
    model, opt = target
    extra = checkpoint.load(saved, model=model, optimizer=opt)
    assert extra == {"step": 3, "note": "ok"}
    ref = checkpoint.read(saved)
    _assert_identical(ref["model"], model.state_dict())
    _assert_identical(ref["optimizer"], opt.state_dict())
    # the file is an ordinary torch archive of plain data
    assert torch.load(saved, weights_only=True)["format"] == checkpoint.FORMAT


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _flip_tensor_byte(path):
    """Flip one bit inside a weight's stored bytes (the zip archive itself does not notice)."""
    raw = bytearray(path.read_bytes())
    weight = checkpoint.read(path)["model"]["0.weight"]
    i = raw.index(weight.numpy().tobytes()) + weight.numel() * weight.element_size() // 2
    raw[i] ^= 0x10
    path.write_bytes(bytes(raw))


def _foreign_state_dict(path):
    torch.save(nn.Linear(4, 8).state_dict(), path)


def _foreign_pickle(path):
    torch.save({"format": checkpoint.FORMAT, "evil": random.Random()}, path)


def _text(path):
    path.write_text("not a checkpoint\n")


@pytest.mark.parametrize("damage, message", [
    (_truncate, "not a readable checkpoint"),
    (_flip_tensor_byte, "corrupted"),
    (_foreign_state_dict, "not a marthe_ext checkpoint"),
    (_foreign_pickle, "not a readable checkpoint"),
    (_text, "not a readable checkpoint"),
])
def test_bad_checkpoint_raises_and_changes_nothing(saved, target, damage, message):
    model, opt = target
    before = _snapshot(model, opt)
    damage(saved)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(saved, model=model, optimizer=opt)
    _assert_unchanged(before, model, opt)


def test_corrupted_digest_check_is_what_catches_the_flip(saved):
    """Without the digest the flipped tensor would load silently: torch accepts it."""
    _flip_tensor_byte(saved)
    torch.load(saved, weights_only=True)
    with pytest.raises(CheckpointError, match="SHA-256"):
        checkpoint.read(saved)


def test_mismatched_checkpoint_raises_and_changes_nothing(saved, tmp_path):
    # an optimizer of other dynamics: the model must stay untouched too
    model, opt = _build("sgdm")
    _train(model, opt, steps=1)
    before = _snapshot(model, opt)
    with pytest.raises(CheckpointError, match="optimizer state does not fit.*dynamics"):
        checkpoint.load(saved, model=model, optimizer=opt)
    _assert_unchanged(before, model, opt)
    # a model of other shapes
    torch.manual_seed(1)
    wide = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 2))
    opt2 = marthe_ext.Marthe(wide.parameters(), lr=0.05, dynamics="adam")
    before = _snapshot(wide, opt2)
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.load(saved, model=wide, optimizer=opt2)
    _assert_unchanged(before, wide, opt2)


def test_save_rejects_what_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\] is a Random"):
        checkpoint.save(tmp_path / "x.pt", extra=random.Random())
    assert not list(tmp_path.iterdir())  # no file, no stray temporary


def test_save_is_atomic_when_writing_fails(saved, monkeypatch):
    """A write that fails half-way leaves the previous checkpoint intact and no temp file."""
    good = saved.read_bytes()

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(saved, step=4)
    assert saved.read_bytes() == good
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


@pytest.mark.parametrize("kw", [
    dict(dynamics="sgdm"),
    dict(dynamics="adamw", weight_decay=1e-2, grad_clip=1.0),
    dict(dynamics="sgd", mu="auto", safeguards=None),
    dict(dynamics="adam", hvp="auto"),
    dict(dynamics="sgdm", loss_scale="dynamic", param_groups=True),
])
def test_marthe_state_dict_loads_with_weights_only(tmp_path, kw):
    """Every entry (tensors, counters, the HVP engine's name, the loss scaler's state,
    per-group lr_scale) is plain data that torch.load(weights_only=True) restores."""
    kw = dict(kw)
    groups = kw.pop("param_groups", False)

    def build():
        model, opt = _build(**kw)
        if groups:
            torch.manual_seed(0)
            w, b = model[0].parameters()
            opt = marthe_ext.Marthe([{"params": [w], "lr_scale": 0.5},
                                     {"params": [b] + list(model[2].parameters())}],
                                    lr=0.05, **kw)
        return model, opt

    model, opt = build()
    _train(model, opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    model2, opt2 = build()
    opt2.load_state_dict(sd)
    _assert_identical(opt.state_dict(), opt2.state_dict())
