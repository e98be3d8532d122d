"""PNG plots for reports, drawn with matplotlib when it is installed (``pip install onnxprune[plots]``).

Every function returns ``True`` when it wrote the file and ``False`` when matplotlib
is missing, so callers can say so instead of failing; files are written atomically.

    plots.channels_kept(report["groups"], "report.channels.png")   # per-layer bars
    plots.sensitivity_curves(sens, "sensitivity.png")               # drop vs ratio per group
"""

from __future__ import annotations

import os

from ..ir import safety

INSTALL_HINT = "matplotlib is not installed; no plot written (pip install onnxprune[plots])"


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, path: str | os.PathLike) -> None:
    try:
        with safety.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def _short(label: str, width: int = 32) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]


def channels_kept(groups: list[dict], path: str | os.PathLike) -> bool:
    """One horizontal bar per pruned group (a prune report's ``groups``): channels kept and removed."""
    plt = _pyplot()
    if plt is None:
        return False
    labels = [_short(g["label"]) for g in groups]
    kept = [g["size"] - len(g["removed_channels"]) for g in groups]
    removed = [len(g["removed_channels"]) for g in groups]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.22 * max(len(groups), 1)))
    y = list(range(len(groups)))
    ax.barh(y, kept, color="#3b75af", label="kept")
    ax.barh(y, removed, left=kept, color="#d9d9d9", label="removed")
    ax.set_yticks(y, labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    ax.set_title("channels kept per group (first layer)", fontsize=9, loc="left")
    ax.legend(fontsize=7, ncol=2, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    _save(plt, fig, path)
    return True


def sensitivity_curves(sens, path: str | os.PathLike) -> bool:
    """Drop in the metric against the ratio removed, one curve per group, with the threshold line."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in sens.groups:
        drops = [d if d != float("inf") else float("nan") for d in g["drops"]]
        ax.plot(sens.ratios, drops, marker="o", linewidth=1, label=_short(g["label"], 28))
    ax.set_xlabel("fraction of the group's channels removed")
    ax.set_ylabel(f"drop in {sens.metric} (points)")
    ax.axhline(sens.threshold, color="grey", linestyle="--", linewidth=0.8)
    if len(sens.groups) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(plt, fig, path)
    return True
