"""The issue-15 probe's per-run summary (python/marthe_experiments/default_probe.py) on
hand-made traces: what it calls frozen, where beta hit its floor, the sign agreement."""
from marthe_experiments import default_probe as probe


def _run(etas, betas, hs, E=0.1):
    return dict(E=E, etas=etas, betas=betas, hs=hs)


def test_summary_of_a_run_whose_beta_sinks_and_lr_freezes():
    n = probe.FREEZE_WINDOW + 50
    etas = [0.01 * 1.1 ** min(i, 40) for i in range(n)]           # climbs 40 steps, then flat
    betas = [1e-3] * 60 + [1e-6] * (n - 60)                       # the floor from step 60
    hs = [-1.0] * 60 + [(-1.0) ** i for i in range(n - 60)]      # agrees, then flips every step
    s = probe.summarise(_run(etas, betas, hs), floor=1e-6)
    assert s["frozen"] and s["floor_step"] == 60 and not s["recovered"]
    assert s["last_move"] == 40 and s["steps_at_floor"] == n - 60
    # agreeing all along before the floor, then a period-2 flip: agreement drops below a half
    assert s["p_agree_after_floor"] < 0.5 and s["p_agree"] > s["p_agree_after_floor"]


def test_summary_of_a_run_that_keeps_moving():
    n = probe.FREEZE_WINDOW + 10
    etas = [0.1 * (1 + 0.01 * ((-1) ** i)) for i in range(n)]
    s = probe.summarise(_run(etas, [1e-2] * n, [1.0] * n), floor=1e-6)
    assert not s["frozen"] and s["floor_step"] is None and s["p_agree"] == 1.0
