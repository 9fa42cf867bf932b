"""Data-parallel Marthe (marthe_ext/distributed.py) over 2 and 3 gloo ranks on 127.0.0.1.

Each spawn runs many small cases (process start is the cost); the test process computes the
one-process references. What is checked:
* every rank ends with bit-identical weights, optimizer state, tangents and hyper-state
  (eta, beta, mu, ...), and returns the same losses;
* N ranks on shards equal one process on the concatenated batch (float64, 1e-10 relative;
  fd engines 1e-6: a finite difference divides rounding by its step ~1e-8, and the
  ranks' sum rounds differently from one process's sum);
* collectives per step do not grow with the number of parameter tensors;
* checkpoints (rank 0's state) resume bit-exactly; one written by one process resumes on
  3 ranks;
* a failing rank makes the others fail with a clear error within a bounded time.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import socket
import time

import pytest
import torch

import distributed_worker as W
import marthe_ext
from marthe_ext import distributed

JOIN_TIMEOUT_S = 240  # a spawn of all cases takes ~20 s on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, world: int, outdir: str, *args, timeout: float = JOIN_TIMEOUT_S) -> list:
    """Start ``world`` ranks of ``target``, join within ``timeout``, kill leftovers; exit codes."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [ctx.Process(target=target, args=(r, world, port, outdir, *args)) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
        codes.append(p.exitcode)
    return codes


def run_ranks(world: int, jobs: list, tmp_path_factory, fail: str) -> dict:
    """Run ``jobs`` on ``world`` ranks, then the failure scenario ``fail`` (rank 1 fails)."""
    outdir = tmp_path_factory.mktemp(f"ranks{world}")
    start = time.monotonic()
    codes = spawn(W.main, world, str(outdir), jobs, fail)
    assert time.monotonic() - start < JOIN_TIMEOUT_S
    assert codes[1] != 0 and codes[:1] + codes[2:] == [0] * (world - 1), f"rank exit codes {codes}"
    return {"jobs": jobs, "ranks": [torch.load(outdir / f"rank{r}.pt") for r in range(world)],
            "failure": [(outdir / f"rank{r}.txt").read_text().split("\n", 1) for r in range(world) if r != 1]}


# --------------------------------------------------------------------------- cases
def _cases() -> list[dict]:
    cases = []
    grid = itertools.product(("sgd", "sgdm", "adam"), (True, False), (0.0, 0.99, 1.0),
                             ("reverse", "forward", "fd"))
    for i, (dyn, val, mu, hvp) in enumerate(grid):
        if mu == 0.0 and hvp != "reverse":
            continue  # mu = 0 takes no HVP: the engine plays no part
        cases.append(dict(id=f"{dyn}-{'val' if val else 'train'}-mu{mu}-{hvp}-{'ddp' if i % 2 else 'bare'}",
                          dynamics=dyn, val=val, mu=mu, hvp=hvp, ddp=bool(i % 2), lr=0.05))
    cases += [
        # the validation gradient is averaged before its clip (0.05 clips many entries)
        dict(id="clip-grad", dynamics="sgdm", mu=0.99, grad_clip=0.05, lr=0.05, safeguards=None,
             hyper_lr=1e-2),
        dict(id="clip-train-ddp", dynamics="adam", mu=0.99, grad_clip=0.05, val=False, ddp=True, lr=0.05),
        dict(id="jvp", dynamics="sgdm", mu=0.99, hypergrad="jvp", lr=0.05),
        dict(id="jvp-ddp-forward", dynamics="adam", mu=1.0, hypergrad="jvp", hvp="forward", ddp=True,
             lr=0.05),
        dict(id="fd-hypergrad", dynamics="sgd", mu=0.99, hypergrad="fd", lr=0.05),
        dict(id="auto-mu", dynamics="sgd", mu="auto", lr=0.05, safeguards=None, hyper_lr=1e-2,
             hyper_lr_adapt=0.1),
        dict(id="faithful-safeguards", dynamics="adamw", mu=0.99, weight_decay=0.1, lr=0.05,
             safeguards=None, hyper_lr=1e-2, max_lr_change=2.0, max_tangent_ratio=0.5),
        dict(id="hvp-auto-ddp", dynamics="sgdm", mu=0.99, hvp="auto", ddp=True, lr=0.05),
        # gradients on some ranks only (Branchy.extra) and on none (Branchy.never)
        dict(id="unused-val", model="branchy", dynamics="sgdm", mu=0.99, weight_decay=0.1, lr=0.05),
        dict(id="unused-train", model="branchy", dynamics="adam", mu=0.99, weight_decay=1.0, val=False,
             lr=0.05, steps=4),
        dict(id="unused-train-ddp", model="branchy", dynamics="sgd", mu=1.0, weight_decay=1.0, val=False,
             lr=0.05, ddp=True),
        # the HVP from a sub-batch (hvp_closure): half of each rank's shard
        dict(id="hvp-closure", dynamics="sgdm", mu=0.99, lr=0.05, hvp_sub=2, ddp=True),
        # the cheaper modes: collectives skipped on the same steps by every rank
        dict(id="every-2", dynamics="sgdm", mu=0.99, lr=0.05, hvp_every=2, hypergrad_every=2, steps=4),
        dict(id="first-order", dynamics="adam", mu=0.99, lr=0.05, first_order=True, ddp=True),
        # replicas seeded differently: the first step starts every rank from rank 0's weights
        dict(id="different-init", dynamics="sgdm", mu=0.99, lr=0.05, seed_by_rank=True),
        # backward style (loss.backward(create_graph=True); opt.step()); under DDP inside
        # no_sync(), val_closure included (README), else DDP's hooks fire on the graph
        dict(id="backward-bare", dynamics="sgdm", mu=0.99, lr=0.05, style="backward"),
        dict(id="backward-ddp", dynamics="adam", mu=0.99, lr=0.05, style="backward-no_sync", ddp=True),
        dict(id="backward-unused-train", model="branchy", dynamics="adam", mu=0.99, weight_decay=1.0,
             val=False, lr=0.05, style="backward"),
    ]
    return cases


CASES = _cases()
FEW = ("sgdm-val-mu0.99-forward-bare", "adam-train-mu1.0-fd-ddp", "sgd-val-mu0.0-reverse-bare",
       "adam-val-mu0.99-reverse-ddp", "jvp", "auto-mu", "clip-grad", "unused-val", "unused-train",
       "backward-ddp", "different-init")
OFF = dict(id="off", dynamics="sgdm", mu=0.99, lr=0.05, process_group=False)
CKPT = dict(id="ckpt", dynamics="adam", mu=0.99, lr=0.05, ddp=True)
COUNT = [dict(id=f"count-{m}-{mode}", model=m, dynamics="sgdm", mu=0.99, lr=0.05, **extra)
         for m in ("mlp", "deep")
         for mode, extra in (("val", {}), ("train", {"val": False}), ("jvp", {"hypergrad": "jvp"}),
                             ("forward", {"hvp": "forward"}))]
# per step after the first (which also broadcasts the weights once): with the reverse engine
# the gradient, loss and mask bucket (launched before the HVP is taken, to overlap it) and
# the HVP's; with the forward engine, which makes both together, one bucket; plus the
# validation gradient (val, forward) or h (jvp)
EXPECTED_COLLECTIVES = {"val": 3, "train": 2, "jvp": 3, "forward": 2}


ORDER = [dict(id=f"order-{hvp}", dynamics="sgdm", mu=0.99, lr=0.05, hvp=hvp) for hvp in ("reverse", "fd", "forward")]


def reference(case: dict) -> dict:
    """One process on the whole batch, closure style (the backward style, given ``loss=``, is
    bit-identical to it, the returned loss included)."""
    return W.run_case({k: v for k, v in case.items() if k != "style"}, 0, 1)


def tolerance(case: dict) -> float:
    return 1e-6 if "fd" in (case.get("hvp"), case.get("hypergrad")) else 1e-10


def flat(result: dict) -> dict[str, torch.Tensor]:
    out = {f"w{i}": w for i, w in enumerate(result["weights"])}
    out.update({f"state.{k}": v for k, v in result["state"].items()})
    out.update({f"hyper.{k}": v for k, v in result["hyper"].items()})
    out["losses"] = result["losses"]
    return out


def assert_identical(results: list[dict]) -> None:
    ref = flat(results[0])
    for r, res in enumerate(results[1:], 1):
        other = flat(res)
        assert other.keys() == ref.keys()
        for k in ref:
            assert torch.equal(other[k], ref[k]), f"rank {r} differs from rank 0 in {k}"


def assert_close(got: dict, want: dict, tol: float) -> None:
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for k in want:
        g, w = got[k].double(), want[k].double()
        finite = w[torch.isfinite(w)]
        scale = finite.abs().max() if finite.numel() else 0
        # equal entries count as exact, infinite ones included (loss_best starts at +inf)
        err = torch.where(g == w, 0.0, g - w).abs().max() if want[k].numel() else 0
        assert err <= tol * scale, f"{k}: error {float(err):.3g} against scale {float(scale):.3g}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    jobs = [("case", c) for c in CASES] + [("case", OFF), ("checkpoint", CKPT, None)]
    jobs += [("count", c) for c in COUNT] + [("fsdp", {"id": "fsdp"}), ("experiments", {"id": "experiments"})]
    jobs += [("order", c) for c in ORDER]
    # the same cases again with 100-byte buckets: many collectives, same result
    jobs += [("bucket_mb", 1e-4)] + [("case", c) for c in CASES if c["id"] in FEW] + [("count", COUNT[0])]
    return run_ranks(2, jobs, tmp_path_factory, fail="hang")


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    # a checkpoint written by one process, resumed on 3 ranks
    ckpt_dir = tmp_path_factory.mktemp("ckpt1")
    path = str(ckpt_dir / "ckpt.pt")
    model, net, opt = W.build(CKPT)
    W.train(CKPT, model, net, opt, 0, 1, 0, 2, [])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    jobs = [("case", c) for c in CASES if c["id"] in FEW] + [("checkpoint", CKPT, path), ("subgroup", OFF)]
    return run_ranks(3, jobs, tmp_path_factory, fail="raise")


def _by_case(spawned: dict, case_id: str, kind: str = "case", small_buckets: bool = False) -> list:
    """Every rank's result of the job ``kind`` for ``case_id``, run with the default buckets
    or, with ``small_buckets``, after the ("bucket_mb", ...) job."""
    small = False
    for j, job in enumerate(spawned["jobs"]):
        small = small or job[0] == "bucket_mb"
        if small == small_buckets and job[0] == kind and job[1]["id"] == case_id:
            return [r[j] for r in spawned["ranks"]]
    raise KeyError(case_id)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_two_ranks_equal_one_process(two_ranks, case):
    results = _by_case(two_ranks, case["id"])
    assert_identical(results)
    assert_close(results[0], reference(case), tolerance(case))


@pytest.mark.parametrize("case_id", FEW)
def test_three_ranks_equal_one_process(three_ranks, case_id):
    case = next(c for c in CASES if c["id"] == case_id)
    results = _by_case(three_ranks, case_id)
    assert_identical(results)
    assert_close(results[0], reference(case), tolerance(case))


def test_eta_moves(two_ranks):
    """The cases are not vacuous: eta changed, and the ranks did average (a rank alone on its
    shard ends elsewhere)."""
    case = CASES[0]
    res = _by_case(two_ranks, case["id"])[0]
    assert float(res["hyper"]["eta"]) != case["lr"]
    alone = W.run_case(case, 0, 2)
    assert not torch.equal(res["weights"][0], alone["weights"][0])


def test_small_buckets_same_result(two_ranks):
    """100-byte buckets: many collectives, the same numbers (2 ranks: a + b is exact in any order)."""
    for case_id in FEW:
        small = _by_case(two_ranks, case_id, small_buckets=True)
        assert_identical(small)
        assert_close(small[0], _by_case(two_ranks, case_id)[0], 0.0)


def test_collectives_do_not_grow_with_parameter_tensors(two_ranks):
    for mode, expected in EXPECTED_COLLECTIVES.items():
        small = _by_case(two_ranks, f"count-mlp-{mode}", "count")[0]
        deep = _by_case(two_ranks, f"count-deep-{mode}", "count")[0]
        assert small[1:] == deep[1:] == [expected] * 2, (mode, small, deep)
    # the counter does see every bucket: 100-byte buckets split the reduction
    tiny = _by_case(two_ranks, COUNT[0]["id"], "count", small_buckets=True)[0]
    assert tiny[1] > EXPECTED_COLLECTIVES["val"], tiny


def test_gradient_reduction_overlaps_the_hvp(two_ranks):
    """autograd.grad calls ("g") and collectives ("c") of a val-mode step, in launch order:
    reverse and fd launch the gradient's all-reduce before they take the HVP (the second
    "g": double backward, or the fd probe's gradient), then the HVP's; forward makes both
    together and reduces them at once; the validation gradient follows."""
    want = {"reverse": "gcgcgc", "fd": "gcgcgc", "forward": "gcgc"}
    for hvp, events in want.items():
        for res in _by_case(two_ranks, f"order-{hvp}", "order"):
            assert res == events, (hvp, res)


def test_sync_off_keeps_replicas_independent(two_ranks):
    results = _by_case(two_ranks, "off")
    for r, res in enumerate(results):
        assert_close(res, W.run_case(OFF, r, 2), 0.0)
    assert not torch.equal(results[0]["weights"][0], results[1]["weights"][0])


def test_checkpoint_resume_is_bit_exact(two_ranks):
    for res in _by_case(two_ranks, "ckpt", "checkpoint"):
        assert_close(res["resumed"], res["continued"], 0.0)


def test_checkpoint_from_one_process_resumes_on_three_ranks(three_ranks):
    results = [r["resumed"] for r in _by_case(three_ranks, "ckpt", "checkpoint")]
    assert_identical(results)
    model, net, opt = W.build(CKPT)
    W.train(CKPT, model, net, opt, 0, 1, 0, 2, [])
    losses: list = []
    W.train(CKPT, model, net, opt, 0, 1, 2, 2, losses)
    assert_close(results[0], W.snapshot(model, opt, losses), 1e-10)


def test_explicit_subgroup(three_ranks):
    """Ranks 0 and 1 average over new_group([0, 1]) on halves of the batch; rank 2 runs alone
    with process_group=False on the whole batch: all three equal one process."""
    results = _by_case(three_ranks, "off", "subgroup")
    want = W.run_case(OFF, 0, 1)
    assert_identical(results[:2])
    assert_close(results[0], want, 1e-10)
    assert_close(results[2], want, 0.0)


def test_fsdp2_parameters_raise_a_clear_error(two_ranks):
    for res in _by_case(two_ranks, "fsdp", "fsdp"):
        assert res.startswith("NotImplementedError") and "DistributedDataParallel" in res, res


def test_experiments_shard_batches_per_rank(two_ranks):
    for r, res in enumerate(_by_case(two_ranks, "experiments", "experiments")):
        assert (res["rank"], res["world"]) == (r, 2)
        assert res["slice"].tolist() == [3 * r, 3 * r + 1, 3 * r + 2]
        assert res["wrapped"] == "DistributedDataParallel"
        assert "does not split evenly over 2 ranks" in res["uneven"]
        assert "ranks ended with different results" in res["disagree"], res["disagree"]
        assert res["bn"].tolist() == [1.0, 1.0] and res["etas"].tolist() == [0.0] * 3


@pytest.mark.parametrize("spawned", ["two_ranks", "three_ranks"])
def test_failing_rank_ends_the_others(spawned, request):
    """After its jobs, rank 1 stops calling collectives (2 ranks) or raises (3 ranks) in its
    second step: the others fail with marthe_ext's error, within the gloo timeout (the
    spawn itself is bounded by JOIN_TIMEOUT_S and its exit codes are checked)."""
    for waited, message in request.getfixturevalue(spawned)["failure"]:
        assert "marthe_ext" in message and "process group" in message, message
        assert float(waited) < W.GLOO_TIMEOUT_S + 15


# --------------------------------------------------------------------------- no processes
def test_process_group_argument_is_checked():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="process_group must be"):
        marthe_ext.Marthe(p, process_group="none")
    assert isinstance(distributed.resolve_sync(None), distributed.NoSync)  # not initialised
    assert isinstance(distributed.resolve_sync(False), distributed.NoSync)
