"""Figures: three-plane montages of volumes (lung window) next to their layouts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .atomic import atomic_path

LUNG_WINDOW = (-1350.0, 150.0)  # level -600, width 1500


def _planes(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    z, y, x = centre
    return [volume[z], volume[:, y][::-1], volume[:, :, x][::-1]]  # axial, coronal, sagittal (superior up)


def three_plane_png(
    path: str | Path,
    panels: Sequence[tuple[str, np.ndarray, str]],
    centre: Sequence[int] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> None:
    """Write a PNG with one row per panel (title, [Z, Y, X] volume, kind) and columns axial/coronal/sagittal.

    kind: ``"hu"`` (lung window), ``"layout"`` (labels 0/1/2). ``centre`` defaults to the centroid of the largest
    nodule of the first layout panel, else the volume centre.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = panels[0][1].shape
    if centre is None:
        centre = [s // 2 for s in shape]
        for _, vol, kind in panels:
            if kind == "layout" and (vol == 2).any():
                labels, n = ndi.label(vol == 2)
                largest = 1 + int(np.argmax(ndi.sum(np.ones_like(labels), labels, range(1, n + 1))))
                centre = np.round(np.argwhere(labels == largest).mean(axis=0)).astype(int).tolist()
                break
    fig, axes = plt.subplots(len(panels), 3, figsize=(7.5, 2.6 * len(panels)), squeeze=False)
    aspects = [spacing[1] / spacing[2], spacing[0] / spacing[2], spacing[0] / spacing[1]]
    for row, (title, vol, kind) in enumerate(panels):
        for col, (plane, aspect) in enumerate(zip(_planes(vol, centre), aspects)):
            ax = axes[row][col]
            if kind == "layout":
                ax.imshow(plane, cmap="viridis", vmin=0, vmax=2, aspect=aspect, interpolation="nearest")
            else:
                ax.imshow(plane, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title)
    for col, name in enumerate(("axial", "coronal", "sagittal")):
        axes[0][col].set_title(name)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
