"""Training curves as PNG from a ``training_summary_*.json`` (written at the end of every run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(summary_path: str | os.PathLike, output_png: str | os.PathLike | None = None) -> Path:
    """Loss (train/val), validation metrics and learning rate per epoch, one panel each."""
    summary = json.loads(Path(summary_path).read_text())
    epochs = summary.get("epochs", [])
    if not epochs:
        raise ValueError(f"{summary_path}: no finished epoch to plot")
    output_png = Path(output_png) if output_png else Path(summary_path).with_name("training_curves.png")
    x = [e["epoch"] for e in epochs]
    numeric = sorted({k for e in epochs for k, v in e.items() if isinstance(v, (int, float)) and k != "epoch"})
    panels = {
        "loss": [k for k in numeric if k.endswith("loss")],
        "validation": [k for k in numeric if k.startswith("val_") and not k.endswith("loss")],
        "learning rate": [k for k in numeric if k == "lr"],
    }
    panels = {title: keys for title, keys in panels.items() if keys}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels.items()):
        for key in keys:
            ax.plot(x, [e.get(key, float("nan")) for e in epochs], marker="o", markersize=3, label=key)
        if summary.get("best_epoch") and title == "validation":
            ax.axvline(summary["best_epoch"], color="grey", linestyle=":", label="best epoch")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "learning rate":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{summary.get('monitor', '')} best {summary.get('best_metric')} — {summary.get('stop_reason', '')}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(output_png, dpi=110)
    plt.close(fig)
    return output_png
