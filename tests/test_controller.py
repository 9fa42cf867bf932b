"""The optimizer's parts: the frozen config, the hyper-controller as the one owner of eta,
beta and mu, validation before mutation, and torch's load_state_dict hooks."""
from __future__ import annotations

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import marthe_ext
from marthe_ext.config import MartheConfig
from marthe_ext.controller import HyperController

PACKAGE = Path(marthe_ext.__file__).parent


def _mlp_and_opt(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = marthe_ext.Marthe(model.parameters(), lr=0.05, backend="torch", **kwargs)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    return model, opt, lambda: nn.functional.mse_loss(model(x), y)


def test_config_is_frozen():
    _, opt, _ = _mlp_and_opt()
    assert isinstance(opt.config, MartheConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.config.lr = 1.0
    with pytest.raises(AttributeError):
        opt.dynamics = "adam"


def _written_scalar_keys(tree: ast.AST) -> set[str]:
    """Keys k of every ``<x>.scalars[k]`` / ``s[k]`` / ``hp[k]`` subscript that is written
    (``.copy_``, ``.add_``, ``.zero_`` ... called on it, or assigned to)."""
    keys = set()
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_"):
            target = node.func.value
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t for t in targets if isinstance(t, ast.Subscript)), None)
        if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant) \
                and isinstance(target.slice.value, str):
            keys.add(target.slice.value)
    return keys


def test_every_rule_that_changes_eta_beta_or_mu_is_in_the_controller():
    """A newcomer finds them in one file (README's layout): no other module of the library
    writes these scalars."""
    owned = {"eta", "beta", "mu", "mu_counter", "h_trend", "h_sq_avg", "h_count", "loss_avg", "loss_count",
             "loss_best", "lr_at_best", "x_trend", "beta_down"}
    assert {"eta", "beta", "mu", "mu_counter"} <= _written_scalar_keys(
        ast.parse((PACKAGE / "controller.py").read_text()))
    for path in PACKAGE.rglob("*.py"):
        if path.name == "controller.py":
            continue
        written = _written_scalar_keys(ast.parse(path.read_text())) & owned
        assert not written, f"{path.relative_to(PACKAGE)} writes {sorted(written)}"


def test_controller_replays_the_paper_update_with_alpha():
    """The controller alone, on a hand-made sequence of h: eta = max(eta - beta h, 0),
    then beta = max(beta + alpha h eta_new, 0); a masked step changes nothing."""
    cfg = MartheConfig.from_arguments(
        lr=0.1, dynamics="sgd", momentum=0.9, nesterov=False, betas=(0.9, 0.999), eps=1e-8,
        weight_decay=0.0, mu=0.5, hyper_lr=0.01, hyper_lr_adapt=0.3, grad_clip=None, hvp="reverse",
        hypergrad="grad", backend="torch", max_lr_change=None, max_lr_growth=None,
        hypergrad_norm=None, hypergrad_norm_decay=0.99, max_tangent_ratio=None, hyper_lr_rprop=None,
        hyper_lr_bounds=(1e-6, 0.1), safeguards=None, has_model=False)
    ctl = HyperController(cfg, torch.device("cpu"))
    eta, beta, clamped = 0.1, 0.01, False
    yes, no = torch.tensor(True), torch.tensor(False)
    for i, h in enumerate([2.0, -1.0, 0.5, 30.0, -4.0, 0.0, 1.5]):
        ok = no if i == 2 else yes
        ctl.update_lr(torch.tensor(h, dtype=torch.float64), ok)
        if i != 2:
            clamped |= eta - beta * h < 0
            eta = max(eta - beta * h, 0.0)
            beta = max(beta + 0.3 * h * eta, 0.0)
        assert float(ctl.scalars["eta"]) == pytest.approx(eta, rel=1e-15, abs=0)
        assert float(ctl.scalars["beta"]) == pytest.approx(beta, rel=1e-15, abs=0)
    assert clamped, "the sequence must hit the clamp at 0 (h = 30)"


def test_rejected_param_group_leaves_the_optimizer_unchanged():
    w = nn.Parameter(torch.zeros(3))
    opt = marthe_ext.Marthe([w], safeguards=None)
    elsewhere = torch.zeros(2, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [elsewhere]})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [w]
    with pytest.raises(ValueError, match="lr_scale"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr_scale": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("bounds,exc", [((0.0, 0.1), ValueError), ((0.1, 0.01), ValueError),
                                        (0.1, TypeError), ((1e-6, float("nan")), ValueError)])
def test_hyper_lr_bounds_are_validated_without_rprop(bounds, exc):
    w = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(exc, match="hyper_lr_bounds"):
        marthe_ext.Marthe(w, safeguards=None, hyper_lr_bounds=bounds)


def test_load_state_dict_runs_torch_hooks():
    model, opt, closure = _mlp_and_opt()
    for _ in range(3):
        opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    _, other, _ = _mlp_and_opt()
    calls = []

    def pre(optimizer, state_dict):
        calls.append("pre")
        assert optimizer is other
        edited = copy.deepcopy(state_dict)
        edited["marthe"]["eta"] = torch.tensor(0.123, dtype=torch.float64)
        return edited

    def post(optimizer):
        calls.append(("post", optimizer.lr))

    other.register_load_state_dict_pre_hook(pre)
    other.register_load_state_dict_post_hook(post)
    other.load_state_dict(sd)
    assert calls == ["pre", ("post", 0.123)]
    assert other.lr == 0.123


@pytest.mark.parametrize("corrupt", ["eta-vector", "eta-string", "no-steps", "state-not-tensor"])
def test_corrupt_hyper_state_fails_before_changing_anything(corrupt):
    model, opt, closure = _mlp_and_opt()
    for _ in range(2):
        opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    if corrupt == "eta-vector":
        sd["marthe"]["eta"] = torch.ones(3)
    elif corrupt == "eta-string":
        sd["marthe"]["eta"] = "0.1"
    elif corrupt == "no-steps":
        del sd["marthe"]["steps_called"]
    else:
        first = next(iter(sd["state"]))
        sd["state"][first]["tangent"] = [0.0]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for k, v in before["marthe"].items():
        assert (torch.equal(v, after["marthe"][k]) if isinstance(v, torch.Tensor) else v == after["marthe"][k])
    for key, st in before["state"].items():
        for name, t in st.items():
            assert torch.equal(t, after["state"][key][name])
