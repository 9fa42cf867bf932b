"""HVP engines with closures that call a torch.compile'd model (marthe_ext/compiled.py)."""
import warnings

import pytest
import torch

import marthe_ext
from marthe_ext.compiled import CompiledModelError
from marthe_ext.hvp import ENGINES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class CountingMLP(torch.nn.Module):
    """Counts its eager executions (neither dynamo's tracing nor a compiled graph counts)."""

    def __init__(self, act):
        super().__init__()
        self.l1, self.act, self.l2 = torch.nn.Linear(6, 12), act, torch.nn.Linear(12, 3)
        self.eager_calls = 0

    def forward(self, x):
        if not torch.compiler.is_compiling():
            self.eager_calls += 1
        return self.l2(self.act(self.l1(x)))


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _train(net, forward, steps=3, **kw):
    opt = marthe_ext.Marthe(net.parameters(), lr=0.05, dynamics="sgdm", mu=0.9, **kw)
    losses = []
    for t in range(steps):
        x, y = _data(t)
        losses.append(opt.step(lambda: torch.nn.functional.cross_entropy(forward(x), y)))
    return opt, torch.stack(losses)


def _pair(act=torch.nn.Tanh):
    """An eager model and a compiled twin with the same weights."""
    torch.manual_seed(0)
    eager = CountingMLP(act())
    twin = CountingMLP(act())
    twin.load_state_dict(eager.state_dict())
    return eager, twin, torch.compile(twin)


@pytest.mark.parametrize("act", [torch.nn.Tanh, torch.nn.ReLU])
def test_explicit_reverse_raises_and_names_the_alternatives(act):
    _, twin, compiled = _pair(act)
    with pytest.raises(CompiledModelError, match="reverse-eager.*hvp='fd'") as info:
        _train(twin, compiled, hvp="reverse")
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error, chained


def test_explicit_forward_raises_and_names_the_alternatives():
    _, twin, compiled = _pair()
    with pytest.raises(CompiledModelError, match="forward-mode.*forward-eager"):
        _train(twin, compiled, hvp="forward", model=twin)


@pytest.mark.parametrize("engine", ["reverse", "forward"])
def test_eager_variants_give_the_eager_models_hvp_bit_for_bit(engine):
    eager, twin, compiled = _pair()
    x, y = _data(0)
    z = [torch.randn_like(p) for p in eager.parameters()]
    ref = ENGINES[engine](lambda: torch.nn.functional.cross_entropy(eager(x), y),
                          list(eager.parameters()), z, True, eager)
    out = ENGINES[engine + "-eager"](lambda: torch.nn.functional.cross_entropy(compiled(x), y),
                                     list(twin.parameters()), z, True, twin)
    assert torch.equal(out[0], ref[0])
    for a, b in zip(out[1] + out[2], ref[1] + ref[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("engine", ["reverse", "forward"])
def test_eager_variants_train_like_the_eager_model(engine):
    eager, twin, compiled = _pair()
    ref_opt, ref_losses = _train(eager, eager, hvp=engine, model=eager)
    opt, losses = _train(twin, compiled, hvp=engine + "-eager", model=twin)
    # Only the first step's gradient (no HVP yet) goes through the compiled graph, whose
    # fused kernels round differently from eager in the last bit; the HVP steps are eager.
    torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=0)
    for p, q in zip(twin.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["tangent"], ref_opt.state[q]["tangent"], rtol=1e-5, atol=1e-7)
    assert opt.lr == pytest.approx(ref_opt.lr, rel=1e-6)


def test_only_hvp_steps_run_eagerly_and_the_compiled_graph_is_used_again():
    _, twin, compiled = _pair()
    _train(twin, compiled, steps=3, hvp="reverse-eager")
    assert twin.eager_calls == 2  # steps 2 and 3 take an HVP; step 1 ran the compiled graph
    compiled(_data(0)[0])  # the stance is back to default
    assert twin.eager_calls == 2


def test_auto_picks_an_exact_engine_that_works_and_says_which():
    eager, twin, compiled = _pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt, losses = _train(twin, compiled, hvp="auto", model=twin)
    messages = [str(w.message) for w in caught if "hvp='auto' uses" in str(w.message)]
    assert len(messages) == 1 and opt.hvp_engine in ("reverse-eager", "forward-eager")
    assert repr(opt.hvp_engine) in messages[0] and "torch.compile" in messages[0]
    assert set(opt.hvp_timings) == {"reverse-eager", "forward-eager"}
    _, ref_losses = _train(eager, eager, hvp="reverse")
    torch.testing.assert_close(losses, ref_losses, rtol=1e-6, atol=0)


def test_fd_works_through_the_compiled_forward():
    eager, twin, compiled = _pair()
    _, ref_losses = _train(eager, eager, hvp="reverse")
    _, losses = _train(twin, compiled, hvp="fd")
    # fd's finite-difference HVP (float32, r ~ sqrt(eps)): a few 1e-4 relative on the loss.
    torch.testing.assert_close(losses, ref_losses, rtol=1e-3, atol=1e-4)


def test_forward_eager_needs_the_model():
    with pytest.raises(ValueError, match="need the model"):
        marthe_ext.Marthe(torch.nn.Linear(2, 2).parameters(), hvp="forward-eager")


def test_a_compiled_step_runs_eagerly_and_equals_the_eager_step():
    """torch.compile(opt.step) (or a compiled training function that calls it) would drop
    the writes to the 0-dim scalars (measured: eta and the step count stayed at their start
    values); the step is excluded from compilation, so it equals the eager step bit for bit."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = marthe_ext.Marthe(model.parameters(), lr=0.05, first_order=True, backend="torch")
        x = torch.randn(4, 3)
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(4):
            step(lambda: model(x).pow(2).mean())
        runs.append((opt.hyper_state()["step"].clone(), opt.hyper_state()["eta"].clone(),
                     [p.detach().clone() for p in model.parameters()]))
    (s0, e0, w0), (s1, e1, w1) = runs
    assert float(s1) == 4.0 and torch.equal(s0, s1) and torch.equal(e0, e1) and float(e1) != 0.05
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))


def test_jvp_hypergradient_of_a_compiled_validation_closure_is_a_clear_error():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    compiled = torch.compile(model)
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, hypergrad="jvp", model=model, hvp="fd",
                            backend="torch")
    x, xv = torch.randn(8, 3), torch.randn(8, 3)
    with pytest.raises(CompiledModelError, match="hypergrad='jvp'.*hypergrad='grad'"):
        opt.step(lambda: compiled(x).pow(2).mean(), lambda: compiled(xv).pow(2).mean())
