"""The lesion-fidelity figures (:func:`lungddpm.metrics.lesion.lesion_fidelity`): the margin profiles per texture
class, and a gallery of synthetic nodules beside real ones."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_path
from ..diffusion.encoding import TEXTURE_CLASSES
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


OTHER = "any / unknown"  # the gallery's rows of the nodules of no texture class


def gallery_rows(real: Sequence[Nodule], synthetic: Sequence[Nodule], per_row: int) -> list[tuple[str, list[Nodule]]]:
    """(label, up to ``per_row`` nodules) per row of the gallery: per texture class a synthetic and a real row,
    then, where any nodule has no texture class (synthetic ``any`` of an unconditional run, real ``unknown`` of an
    unrated label map), a synthetic and a real row of those (:data:`OTHER`)."""

    def row_class(n: Nodule) -> str:
        return n.texture_class if n.texture_class in TEXTURE_CLASSES else OTHER

    classes = [*TEXTURE_CLASSES, *[OTHER] * any(row_class(n) == OTHER for n in (*real, *synthetic))]
    return [(f"{label} {cls}", [n for n in group if row_class(n) == cls][:per_row]) for cls in classes
            for label, group in (("synthetic", synthetic), ("real", real))]  # fmt: skip


def gallery(real: Sequence[Nodule], synthetic: Sequence[Nodule], s: FidelitySettings, path: Path) -> None:
    """The rows of :func:`gallery_rows`: up to ``gallery`` nodules each (the axial slice through each nodule's
    centre, at -1000..400 HU: narrower and higher than the montages' lung window, -1350..150, for their texture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = gallery_rows(real, synthetic, s.gallery)
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
