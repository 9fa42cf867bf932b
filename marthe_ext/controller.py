r"""``HyperController``: eta, beta and mu, and every rule that changes them (one file).

MARTHE's tangent gives the hypergradient :math:`h_t = \langle \nabla E, Z^w \rangle`; this
object turns it into the next learning rate. It owns the device scalars (float64, on the
parameters' device, so ``step()`` never waits for the device):

    eta, beta, mu, mu_counter   the LR, its own step size, the tangent's discount
    step, skipped               applied and skipped steps
    last_hypergrad              this step's h
    h_sq_avg, h_count           (b): the running mean of h^2 and its bias-correction count
    h_trend                     (d): the running average of h
    x_trend, beta_down          (f): the running average of the normalised h; the meta
                                step of decreases (beta itself without (f))

Every update is masked by ``ok`` (a device bool): a skipped step changes nothing.

**The paper's update** (``safeguards=None``, SPEC section 2, step 5):

.. math:: \eta \leftarrow \max(\eta - \beta h, 0)

**Safeguards of the LR update** (``Marthe``'s default is the preset "robust" = (b) "rms-log"
+ (a') 1.1 + (d) (0.5, 1.2) + (e) 0.5 + (f) 2; the tangent cap (c) is in ``safeguards.py``):

(a) ``max_lr_change = rho > 1``: :math:`\eta_{t+1} \in [\eta_t / \rho,\ \rho\, \eta_t]`.

(a') ``max_lr_growth = rho_up > 1``: growth only, :math:`\eta_{t+1} \le \rho_{up}\, \eta_t`;
    decreases stay free, so a runaway is braked as hard as the hypergradient says.

(b) ``hypergrad_norm``: divide by a running RMS (bias-corrected, decay ``d``), so beta no
    longer depends on the scale of h (Adam-style meta-updates):

    .. math:: v \leftarrow d v + (1-d) x^2, \quad \hat x = x / \sqrt{v / (1 - d^n)}

    "rms": :math:`x = h` and :math:`\eta \leftarrow \max(\eta - \beta \hat x, 0)`.
    "rms-log": descend in log eta, :math:`x = \eta h = \partial E / \partial \log\eta` and
    :math:`\eta \leftarrow \eta\, e^{-\beta \hat x}`: beta is a relative step, eta stays
    positive without a clamp, and :math:`|\log(\eta_{t+1}/\eta_t)| \le \beta/\sqrt{1-d}`.

(d) ``hyper_lr_rprop = (shrink, grow)`` with (b): beta adapts multiplicatively from the
    sign agreement of h with its trend (delta-bar-delta / Rprop one level up):

    .. math:: \beta_t = \mathrm{clip}\big(\beta_{t-1} \cdot
              \{\text{grow if } h_t \bar h_{t-1} > 0;\ \text{shrink if } h_t \bar h_{t-1} < 0;
              \ 1 \text{ otherwise}\},\ \beta_{min}, \beta_{max}\big),
              \qquad \bar h_t = 0.9\, \bar h_{t-1} + 0.1\, h_t,

    and this step's LR update uses :math:`\beta_t`. Agreement with the trend (eta is far from
    where E wants it) lengthens the meta step geometrically; disagreement (overshoot or
    noise) shortens it. Comparing with the trend rather than with the previous h ignores
    the period-2 sign flips a tangent shows at a large LR, which would otherwise freeze
    beta at its floor (measured: the README's study). beta = 0 stays 0 (LR fixed).
    beta holds on average where the agreement rate p satisfies
    :math:`p \log(grow) + (1-p) \log(shrink) = 0`: 0.79 for the default (0.5, 1.2), 0.61
    for (0.75, 1.2). Below it beta sinks to its floor and the LR freezes: pure noise
    (p = 0.5) shrinks beta by about 23 % a step on average under (0.5, 1.2), 5 % under
    (0.75, 1.2). On a BatchNorm CNN (a real but noisy trend, p about 0.6-0.75) (0.5, 1.2)
    alone freezes the LR where (0.75, 1.2) keeps it decaying; on the demo's problem the same
    liveliness let the LR creep up into an overshoot. So (0.75, 1.2) is an option, not the
    default, and the default answers the noisy trend with (f) instead (measured: README,
    "The default's study").

(e) ``loss_trust = tau > 0``: a trust region on the LR from the training loss the step sees
    (the closure's loss, or ``step(loss=...)`` in backward style; none seen: inactive). With
    :math:`\bar\ell_t` the bias-corrected running mean of the loss (decay 0.9),
    :math:`\ell^*` its lowest value so far and :math:`\eta^*` the LR when it was reached:

    .. math:: \bar\ell_t > \ell^* + \tau |\ell^*| \ \Rightarrow\
              \eta_{t+1} \leftarrow \min(\eta_{t+1}, \eta^*), \quad
              \beta_t \leftarrow \max(\text{shrink}\cdot\beta_t, \beta_{min})

    (shrink from (d), and (f)'s :math:`\beta^\downarrow` likewise; beta unchanged without (d)). A hypergradient that keeps asking for a
    larger LR while the loss climbs (measured: the digits collapse of issue 15, where h < 0
    at an LR 5x past the best constant one) is overruled by the loss itself, and the LR goes
    back to one that was training well. Rises within the band (mini-batch noise) change nothing.

(f) ``decay_trend = z > 0`` with (b) and (d): decreases of the LR get their own meta step
    :math:`\beta^\downarrow`, which also grows when the normalised hypergradient asks for a
    smaller LR *as a trend*, with a z-score above z. With :math:`\hat x_t` the normalised h
    of (b) (its sign is h's: > 0 asks for a smaller LR) and its running mean
    :math:`m_t = 0.95\, m_{t-1} + 0.05\, \hat x_t` (about 20 steps, from 0):

    .. math:: \beta^\downarrow_t = \mathrm{clip}\big(\beta^\downarrow_{t-1} \cdot
              \{\text{grow if } m_{t-1} > z\, s;\ \text{else (d)'s factor}\},
              \ \beta_{min}, \beta_{max}\big), \qquad s = \sqrt{(1 - 0.95)/(1 + 0.95)} = 0.160,

    from :math:`\beta^\downarrow_0 = \beta_0`; the LR step uses :math:`\beta^\downarrow_t`
    where :math:`\hat x_t > 0` and (d)'s :math:`\beta_t` where :math:`\hat x_t < 0` (so
    :math:`\beta^\downarrow \ge \beta`: it takes the same factors, and grow where (d) may
    not). s is the standard deviation of m for white noise of unit RMS, what (b) makes of pure
    noise: with z = 2 pure noise passes the test about 2 % of the time. (d) compares one h
    with the trend; a BatchNorm CNN's h agrees with its real decay trend only 60-75 % of the
    time, below (d)'s 79 %, so beta sank and the LR froze where a decay pays. The mean of 20
    such h is far more certain than any one of them: on the recorded default runs of issue
    15's study the test passes in 11-71 % of the CNN's steps and in 0-7 % of those of digits,
    the demo's problem and E1. Only decreases are trusted this way, and they get a step of
    their own: a first version grew (d)'s beta itself, and on the CNN under Adam the beta a
    decay trend had raised then drove the LR up 27x in 45 steps once h asked for growth (E
    1.95: README, "The default's study"). An LR pushed too low only slows a run, and h then
    asks for more, which (d) answers at its own pace.

    ``decay_trend_test="sign"`` averages :math:`\mathrm{sign}(\hat x_t)` instead of
    :math:`\hat x_t` (the same s: white-noise signs have unit RMS too), so m is
    :math:`2p - 1` over about 20 steps with p the share of steps asking for a smaller LR: a
    test of the median, not the mean. Late in a BatchNorm CNN's run h asks for a smaller LR in
    most steps while a few large h asking for more cancel the mean (measured: README, "The
    default's study").

**The paper's beta adaptation** (``hyper_lr_adapt = alpha > 0``, after the LR update):
:math:`\beta \leftarrow \max(\beta + \alpha\, h\, \eta_{new}, 0)`.

**Automatic mu** (``mu="auto"``, the authors' rule, after the LR update, from the validation
gradient and this step's clipped training gradient):
:math:`q = \eta / \langle \nabla E, g_c \rangle`, :math:`z = \mathrm{clip}(q, 0, 1)`,
:math:`c \leftarrow c\, \mathrm{sign}(\mu) + \mu`, :math:`\mu \leftarrow z^{1/(c+1)}`, from
mu = -1 (the sentinel "no update yet"; the tangent uses clip(mu, 0, 1)) and c = 0.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .config import MartheConfig

TREND_DECAY = 0.9  # (d): the hypergradient trend averages about the last 10 steps
DECAY_TREND_DECAY = 0.95  # (f): the normalised trend averages about the last 20 steps
# (f): the standard deviation of that average for white noise of unit RMS
DECAY_TREND_SE = math.sqrt((1 - DECAY_TREND_DECAY) / (1 + DECAY_TREND_DECAY))
LOSS_DECAY = 0.9   # (e): the loss average spans about the last 10 steps

# Checkpoint entries of the controller (the keys of ``HyperController.scalars``).
SCALAR_KEYS = ("eta", "beta", "mu", "mu_counter", "step", "skipped", "last_hypergrad",
               "h_sq_avg", "h_count")
# Added after the first checkpoints were written: absent from a state dict means its start value.
SCALAR_KEYS_SINCE_V1 = ("h_trend", "loss_avg", "loss_count", "loss_best", "lr_at_best", "x_trend",
                        "beta_down")


def start_value(key: str, eta, beta):
    """The start value of a ``SCALAR_KEYS_SINCE_V1`` entry, which is also what a checkpoint
    without it loads as: 0, except no best loss yet (+inf), the LR at it (eta) and (f)'s
    meta step of decreases (beta)."""
    return {"loss_best": math.inf, "lr_at_best": eta, "beta_down": beta}.get(key, 0.0)


def normalized(x: Tensor, sq_avg: Tensor, count: Tensor, decay: float, ok: Tensor) -> Tensor:
    """(b): update the running mean of x^2 (in place, where ok) and return x / RMS (0 when RMS = 0)."""
    new_sq = decay * sq_avg + (1 - decay) * x * x
    new_count = count + 1
    # An x so large that x^2 overflows would make the RMS infinite for good (and every later
    # normalised step 0: a frozen LR); it is left out of the statistics instead.
    ok = ok & torch.isfinite(new_sq)
    sq_avg.copy_(torch.where(ok, new_sq, sq_avg))
    count.copy_(torch.where(ok, new_count, count))
    v_hat = new_sq / (1 - decay ** new_count)
    safe = torch.where(v_hat > 0, v_hat, torch.ones_like(v_hat))
    return torch.where(v_hat > 0, x / torch.sqrt(safe), torch.zeros_like(x))


def next_lr(eta: Tensor, beta: Tensor, h: Tensor, *, norm: Optional[str], sq_avg: Tensor,
            count: Tensor, decay: float, rho: Optional[float], ok: Tensor,
            rho_up: Optional[float] = None, beta_down: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The LR after one hypergradient step: the paper's update, or (b) with (a) and (a')
    (with (f), ``beta_down`` is the meta step where the normalised h asks for a decrease);
    and the step's normalised h (h itself without (b))."""
    if norm is None:
        x = h
    else:  # "rms-log" normalises d E / d log eta = eta h, "rms" h itself
        x = normalized(eta * h if norm == "rms-log" else h, sq_avg, count, decay, ok)
    if beta_down is not None:
        beta = torch.where(x > 0, beta_down, beta)
    if norm == "rms-log":
        eta_new = eta * torch.exp(-beta * x)
    else:
        eta_new = torch.clamp(eta - beta * x, min=0.0)
    if rho is not None:
        eta_new = torch.minimum(torch.maximum(eta_new, eta / rho), eta * rho)
    if rho_up is not None:
        eta_new = torch.minimum(eta_new, eta * rho_up)
    return eta_new, x


def rprop_factor(h: Tensor, trend: Tensor, *, shrink: float, grow: float, ok: Tensor) -> Tensor:
    """(d): grow / shrink when h agrees / disagrees in sign with the trend (1 when either is 0
    or non-finite); the trend is updated in place where ok."""
    agree = h * trend
    trend.copy_(torch.where(ok, TREND_DECAY * trend + (1 - TREND_DECAY) * h, trend))
    return torch.where(agree > 0, torch.full_like(h, grow),
                       torch.where(agree < 0, torch.full_like(h, shrink), torch.ones_like(h)))


def scaled_hyper_lr(beta: Tensor, factor: Tensor, low: float, high: float) -> Tensor:
    """beta times the factor, clipped to [low, high]; beta = 0 stays 0 (the LR fixed)."""
    return torch.where(beta > 0, torch.clamp(beta * factor, min=low, max=high), beta)


def auto_mu(mu: Tensor, counter: Tensor, eta: Tensor, dot: Tensor) -> tuple[Tensor, Tensor]:
    """The authors' rule, from ``dot = <grad E, g_c>``; returns (mu, counter).

    Defined everywhere (never NaN): ``dot <= 0`` or non-finite gives z = 0 (no evidence that
    the past helps, so forget it); 1 / (c + 1) with c + 1 <= 0 (c = -1 after the first update
    from the -1 sentinel) is +inf, so mu = 1 if z == 1 else 0.
    """
    q = eta / torch.where(dot > 0, dot, torch.ones_like(dot))
    z = torch.where(dot > 0, torch.clamp(q, 0.0, 1.0), torch.zeros_like(q))
    c_new = counter * torch.sign(mu) + mu
    exponent = torch.where(c_new + 1 > 0, 1.0 / torch.clamp(c_new + 1, min=1e-300),
                           torch.full_like(c_new, math.inf))
    return torch.pow(z, exponent), c_new


def trust_broken(s: dict[str, Tensor], loss: Tensor, tau: float, ok: Tensor) -> Tensor:
    """(e): update the loss statistics in place (where ok and the loss is finite) and return
    whether the running loss is above its best by more than tau |best| (a device bool)."""
    seen = ok & torch.isfinite(loss)
    avg = torch.where(seen, LOSS_DECAY * s["loss_avg"] + (1 - LOSS_DECAY) * loss, s["loss_avg"])
    count = s["loss_count"] + seen.to(s["loss_count"].dtype)
    smoothed = avg / torch.clamp(1 - LOSS_DECAY ** count, min=1 - LOSS_DECAY)
    improved = seen & (smoothed < s["loss_best"])
    s["lr_at_best"].copy_(torch.where(improved, s["eta"], s["lr_at_best"]))
    s["loss_best"].copy_(torch.where(improved, smoothed, s["loss_best"]))
    s["loss_avg"].copy_(avg)
    s["loss_count"].copy_(count)
    # |best|: a loss may be negative (a log-likelihood); for a positive one this is (1 + tau) best.
    return seen & (smoothed > s["loss_best"] + tau * torch.abs(s["loss_best"]))


# The scalars one LR update reads and writes (the compiled update takes exactly these).
LR_UPDATE_KEYS = ("eta", "beta", "last_hypergrad", "h_sq_avg", "h_count", "h_trend",
                  "loss_avg", "loss_count", "loss_best", "lr_at_best", "x_trend", "beta_down")


def lr_update_(cfg: MartheConfig, s: dict[str, Tensor], h: Tensor, ok: Tensor, loss: Tensor) -> None:
    """One LR update from the hypergradient h, in place on the scalars ``s``: (d) adapts beta
    first (and (f) beta_down, from the trend of the steps before), then the paper's update or
    (a)/(a')/(b), then (f)'s trend takes this step's normalised h, then (e) from this step's
    training loss (NaN: none seen), then alpha's beta adaptation; nothing changes where not
    ok. Pure tensor code with host constants from ``cfg`` (compilable)."""
    beta, beta_down = s["beta"], None
    low, high = cfg.hyper_lr_bounds
    if cfg.hyper_lr_rprop is not None:
        shrink, grow = cfg.hyper_lr_rprop
        factor = rprop_factor(h, s["h_trend"], shrink=shrink, grow=grow, ok=ok)
        beta = scaled_hyper_lr(beta, factor, low, high)
        s["beta"].copy_(torch.where(ok, beta, s["beta"]))
        if cfg.decay_trend is not None:
            # (f): the test reads the trend of the steps before this one
            trending = s["x_trend"] > cfg.decay_trend * DECAY_TREND_SE
            beta_down = scaled_hyper_lr(s["beta_down"], torch.where(trending, torch.full_like(factor, grow), factor),
                                        low, high)
            s["beta_down"].copy_(torch.where(ok, beta_down, s["beta_down"]))
    s["last_hypergrad"].copy_(h)
    eta_new, x = next_lr(
        s["eta"], beta, h, norm=cfg.hypergrad_norm, sq_avg=s["h_sq_avg"], count=s["h_count"],
        decay=cfg.hypergrad_norm_decay, rho=cfg.max_lr_change, ok=ok, rho_up=cfg.max_lr_growth,
        beta_down=beta_down)
    if cfg.decay_trend is not None:
        trend_input = torch.sign(x) if cfg.decay_trend_test == "sign" else x
        x_trend = DECAY_TREND_DECAY * s["x_trend"] + (1 - DECAY_TREND_DECAY) * trend_input
        s["x_trend"].copy_(torch.where(ok & torch.isfinite(x_trend), x_trend, s["x_trend"]))
    if cfg.loss_trust is not None:
        broken = trust_broken(s, loss, cfg.loss_trust, ok)
        eta_new = torch.where(broken, torch.minimum(eta_new, s["lr_at_best"]), eta_new)
        if cfg.hyper_lr_rprop is not None:
            for key in ("beta", "beta_down"):
                shrunk = torch.clamp(s[key] * cfg.hyper_lr_rprop[0], min=low)
                s[key].copy_(torch.where(broken & (s[key] > 0), shrunk, s[key]))
    # A finite h can still overflow eta or beta (e.g. alpha's beta after a huge h, then
    # inf * 0 = NaN): a non-finite result is not applied, the value stays.
    if cfg.hyper_lr_adapt:
        beta_new = torch.clamp(s["beta"] + cfg.hyper_lr_adapt * h * eta_new, min=0.0)
        s["beta"].copy_(torch.where(ok & torch.isfinite(beta_new), beta_new, s["beta"]))
    if cfg.decay_trend is None:
        # Without (f) the step of decreases is beta itself: kept equal, so a checkpoint
        # resumed with (f) on starts it from beta, as one written before (f) existed does.
        s["beta_down"].copy_(s["beta"])
    s["eta"].copy_(torch.where(ok & torch.isfinite(eta_new), eta_new, s["eta"]))


class HyperController:
    """Owns eta, beta, mu and their statistics; applies the rules above, masked by ``ok``."""

    def __init__(self, config: MartheConfig, device: torch.device):
        self.config = config
        f64 = dict(dtype=torch.float64, device=device)
        self.scalars: dict[str, Tensor] = {
            "eta": torch.tensor(config.lr, **f64),
            "beta": torch.tensor(config.hyper_lr, **f64),
            # auto: -1 marks "no update yet" (the authors' sentinel); the tangent uses clip(mu, 0, 1).
            "mu": torch.tensor(-1.0 if config.mu_auto else config.mu, **f64),
            "mu_counter": torch.zeros((), **f64),
            "step": torch.zeros((), **f64),
            "skipped": torch.zeros((), dtype=torch.int64, device=device),
            "last_hypergrad": torch.zeros((), **f64),
            "h_sq_avg": torch.zeros((), **f64),
            "h_count": torch.zeros((), **f64),
            **{k: torch.tensor(start_value(k, config.lr, config.hyper_lr), **f64) for k in SCALAR_KEYS_SINCE_V1},
        }
        self._no_loss = torch.tensor(math.nan, **f64)  # (e)'s input when no loss is seen: read only
        self._compiled_lr_update = None
        if config.compile_lr_update:
            from .fused_lr import compiled_lr_update

            self._compiled_lr_update = compiled_lr_update(config)

    # ------------------------------------------------------------------ reads
    @property
    def eta(self) -> Tensor:
        return self.scalars["eta"]

    def zero(self) -> Tensor:
        """A float64 device zero, the start of a sum of partial hypergradients."""
        return torch.zeros_like(self.scalars["eta"])

    def mu_for_tangent(self) -> Tensor:
        """The discount the tangent update uses: clip(mu, 0, 1) (mu = -1 is auto's sentinel)."""
        return torch.clamp(self.scalars["mu"], 0.0, 1.0)

    # ------------------------------------------------------------------ rules
    def count_step(self, ok: Tensor) -> Tensor:
        """Advance the step count where ok; returns the count after this step (Adam's k)."""
        step_k = self.scalars["step"] + ok.to(torch.float64)
        self.scalars["step"].copy_(step_k)
        return step_k

    def count_skip(self, ok: Tensor) -> None:
        self.scalars["skipped"].add_((~ok).to(torch.int64))

    def update_lr(self, h: Tensor, ok: Tensor, loss: Optional[Tensor] = None) -> None:
        """One LR update from the hypergradient h and this step's training loss (None: not
        seen, (e) does nothing) (``lr_update_``); with ``compile_lr_update=True`` the same
        function compiled into one kernel (``fused_lr.py``)."""
        loss = self._no_loss if loss is None else loss.detach().to(self.scalars["eta"]).reshape(())
        if self._compiled_lr_update is not None:
            self._compiled_lr_update(self.scalars, h, ok, loss)
        else:
            lr_update_(self.config, self.scalars, h, ok, loss)

    def update_mu(self, dot: Tensor, ok: Tensor) -> None:
        """mu="auto": the authors' rule from ``dot = <grad E, g_c>`` (after the LR update)."""
        s = self.scalars
        mu_new, c_new = auto_mu(s["mu"], s["mu_counter"], s["eta"], dot)
        s["mu_counter"].copy_(torch.where(ok, c_new, s["mu_counter"]))
        s["mu"].copy_(torch.where(ok, mu_new, s["mu"]))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.scalars.items()}

    @staticmethod
    def check_state_dict(meta: dict) -> None:
        for k in SCALAR_KEYS + SCALAR_KEYS_SINCE_V1:
            if k not in meta:
                if k in SCALAR_KEYS_SINCE_V1:
                    continue
                raise ValueError(f"state dict lacks the hyper-state entry {k!r}")
            value = meta[k]
            if not isinstance(value, (Tensor, int, float)) or torch.as_tensor(value).numel() != 1:
                raise ValueError(f"hyper-state entry {k!r} must be a scalar, got {value!r}")

    def load_state_dict(self, meta: dict) -> None:
        """Copy the saved scalars in (checked first by ``check_state_dict``)."""
        for k in SCALAR_KEYS:
            self.scalars[k].copy_(meta[k])
        for k in SCALAR_KEYS_SINCE_V1:
            self.scalars[k].copy_(torch.as_tensor(
                meta[k] if k in meta else start_value(k, self.scalars["eta"], self.scalars["beta"]),
                dtype=torch.float64))
