"""Figures (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import downsample  # noqa: E402

COLORS = {"LRS-OPT": "black", "MARTHE": "tab:red", "HD": "tab:blue", "RTHO": "tab:green",
          "Exponential": "tab:orange", "Constant": "tab:gray", "SF-SGD": "tab:purple",
          "SF-AdamW": "tab:purple", "Prodigy": "tab:brown"}


def _finite(values):
    return [v if v is not None and math.isfinite(v) else float("nan") for v in values]


def plot_e1(results: dict, best: dict, path: Path) -> None:
    """LR schedules, validation loss over steps, and LRS-OPT's E over its outer iterations."""
    panels = 3 if results.get("lrs_opt") else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    for family, run in best.items():
        style = dict(color=COLORS.get(family), lw=2.0 if family == "LRS-OPT" else 1.2)
        axes[0].plot(range(len(run["lrs"])), _finite(run["lrs"]), label=run["label"], **style)
        axes[1].plot(run["eval_steps"], _finite(run["val_loss_curve"]), label=family, **style)
    axes[0].set(xlabel="step t", ylabel="learning rate $\\eta_t$", title="LR schedules")
    axes[1].set(xlabel="step t", ylabel="validation loss", title="Validation loss", yscale="log")
    axes[0].legend(fontsize=6)
    if panels == 3:
        history = results["lrs_opt"]["E_history"]
        axes[2].plot(range(len(history)), _finite(history), "k.-")
        axes[2].set(xlabel="outer iteration", ylabel="E = val loss after T steps", title="LRS-OPT")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_demo(rows: list[dict], path: Path) -> None:
    """The demo's figure: every method's LR schedule and validation loss over the steps."""
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.0))
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(rows):
        family = r["method"].split(" ")[0]
        style = dict(color=COLORS.get(family), lw=1.2, ls=styles[i % len(styles)], label=r["method"])
        axes[0].plot(range(len(r["lrs"])), _finite(r["lrs"]), **style)
        axes[1].plot(r["eval_steps"], _finite(r["val_loss_curve"]), **style)
    axes[0].set(xlabel="step t", ylabel="learning rate $\\eta_t$ (0 not shown)", title="LR schedules",
                yscale="log")
    axes[1].set(xlabel="step t", ylabel="validation loss", title="Validation loss", yscale="log")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_e2(summary: list[dict], curves: dict, path: Path) -> None:
    """Per (model, protocol): LR curves of each method's first seed, and test accuracy (mean, std)."""
    groups = list(dict.fromkeys((s["model"], s["protocol"]) for s in summary))
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.4), squeeze=False)
    for j, (model, protocol) in enumerate(groups):
        rows = [s for s in summary if s["model"] == model and s["protocol"] == protocol]
        ax = axes[0][j]
        for s in rows:
            lrs = curves.get((model, protocol, s["family"]))
            if lrs:
                idx, vals = downsample(lrs, 400)
                ax.plot(idx, _finite(vals), label=s["family"], color=COLORS.get(s["family"]), lw=1.0)
        ax.set(title=f"{model} / {protocol}", xlabel="step", ylabel="learning rate (0 not shown)", yscale="log")
        ax.legend(fontsize=6)
        ax = axes[1][j]
        names = [s["family"] for s in rows]
        means = [s["test_acc_mean"] if s["test_acc_mean"] is not None else float("nan") for s in rows]
        stds = [s["test_acc_std"] or 0.0 for s in rows]
        ax.bar(range(len(rows)), means, yerr=stds, color=[COLORS.get(n, "gray") for n in names], capsize=3)
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=7)
        finite = [m for m in means if math.isfinite(m)]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.03))
        ax.set(ylabel="test accuracy (mean, std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
