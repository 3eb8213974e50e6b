"""The report's figures: the training loss and the image-quality bars (and a placeholder where a figure has no
data in this configuration)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..io import read_csv


def loss_figure(train_log: Path, out_png: Path) -> None:
    """Training loss (and its running mean) against step → PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(train_log)
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 5:
        w = max(5, len(loss) // 20)
        ax.plot(steps[w - 1 :], np.convolve(loss, np.ones(w) / w, mode="valid"), lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def placeholder_figure(text: str, out_png: Path) -> None:
    """A small PNG that says ``text`` (for a declared figure that has no data in this configuration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 1), dpi=100)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def cells(row: dict[str, str], keys: Sequence[str] = ("value", "ci_low", "ci_high")) -> list[float]:
    """A CSV row's numbers; an empty cell (an undefined value or interval) is NaN."""
    return [float(row[k]) if row[k] not in ("", None) else float("nan") for k in keys]


def quality_figure(rows: Sequence[dict[str, str]], out_png: Path) -> None:
    """Bar plot of each distribution metric and region: synthetic-vs-real beside the real-vs-real floor, with
    CIs → PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dist = [r for r in rows if r["comparison"] in ("synthetic-vs-real", "real-vs-real")]
    keys = sorted({(r["metric"], r["region"]) for r in dist})
    if not keys:
        placeholder_figure("no image-quality rows", out_png)
        return
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(2.4 * max(1, len(keys)), 3.2), dpi=100, squeeze=False)
    for ax, (metric, region) in zip(axes[0], keys):
        for i, comp in enumerate(("synthetic-vs-real", "real-vs-real")):
            for r in dist:
                if (r["metric"], r["region"], r["comparison"]) == (metric, region, comp):
                    v, lo, hi = cells(r)
                    ax.bar(i, v, color=("tab:orange", "tab:blue")[i])
                    if np.isfinite(lo) and np.isfinite(hi):  # none for a set of one patient
                        ax.vlines(i, lo, hi, color="k")  # the interval as it is, even where it lies above its value
                        ax.hlines([lo, hi], i - 0.1, i + 0.1, color="k")
        ax.set_xticks([0, 1], ["synthetic", "real floor"], fontsize=8)
        ax.set_title(f"{metric.upper()} ({region})", fontsize=9)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
