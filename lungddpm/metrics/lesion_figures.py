"""The lesion-fidelity figures (:func:`lungddpm.metrics.lesion.lesion_fidelity`): the margin profiles per texture
class, and a gallery of synthetic nodules beside real ones."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..diffusion.encoding import TEXTURE_CLASSES
from ..io import atomic_path
from .lesion import ALL, FidelitySettings, Nodule, mean_profile, profile_bins


def plot_profiles(real: Sequence[Nodule], synthetic: Sequence[Nodule], s: FidelitySettings, path: Path) -> None:
    """One panel per texture class (and all): the mean margin profile of the real and the synthetic nodules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = profile_bins(s)
    classes = [*TEXTURE_CLASSES, ALL]
    fig, axes = plt.subplots(1, len(classes), figsize=(4 * len(classes), 3.4), sharey=True)
    for ax, cls in zip(axes, classes):
        for label, group in (("real", real), ("synthetic", synthetic)):
            sel = [n for n in group if cls in (ALL, n.texture_class)]
            if sel:
                ax.plot(bins, mean_profile(sel), marker=".", label=f"{label} (n={len(sel)})")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(cls)
        ax.set_xlabel("distance to the nodule boundary (mm, < 0 inside)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("mean HU")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def gallery(real: Sequence[Nodule], synthetic: Sequence[Nodule], s: FidelitySettings, path: Path) -> None:
    """Per texture class two rows: up to ``gallery`` synthetic nodules, then as many real ones (the axial slice
    through each nodule's centre, lung window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for cls in TEXTURE_CLASSES:
        for label, group in (("synthetic", synthetic), ("real", real)):
            rows.append((f"{label} {cls}", [n for n in group if n.texture_class == cls][: s.gallery]))
    n_col = max(1, s.gallery)
    fig, axes = plt.subplots(len(rows), n_col, figsize=(1.6 * n_col, 1.7 * len(rows)), squeeze=False)
    for axrow, (label, group) in zip(axes, rows):
        for j, ax in enumerate(axrow):
            ax.axis("off")
            if j < len(group):
                ax.imshow(group[j].crop, cmap="gray", vmin=-1000, vmax=400)
        axrow[0].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
