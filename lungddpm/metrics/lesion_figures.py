"""The lesion-fidelity figures (:func:`lungddpm.metrics.lesion.lesion_fidelity`): the margin profiles per texture
class, and a gallery of synthetic nodules beside real ones."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_path
from ..diffusion.encoding import TEXTURE_CLASSES
from .lesion import ALL, FidelitySettings, Nodule, mean_profile, patient_halves, profile_bins


def profile_curves(real: Sequence[Nodule], synthetic: Sequence[Nodule], s: FidelitySettings) -> list[
        tuple[str, list[tuple[str, list[Nodule]]]]]:  # fmt: skip
    """Per texture class (and all): (class, [(label, nodules)]), the real nodules as the fidelity table's halves
    (:func:`.lesion.patient_halves`, the same seeds: A and B, whose gap is the floor; the synthetic row is scored
    against B), or all of them where they are one patient's; then the synthetic nodules. Empty sets left out."""
    out = []
    for k, cls in enumerate([*TEXTURE_CLASSES, ALL]):
        r = [n for n in real if cls in (ALL, n.texture_class)]
        half_a, half_b = patient_halves(r, [s.seed, k])
        reals = [("real A", half_a), ("real B", half_b)] if half_a and half_b else [("real", r)]
        syn = [n for n in synthetic if cls in (ALL, n.texture_class)]
        out.append((cls, [(label, group) for label, group in (*reals, ("synthetic", syn)) if group]))
    return out


def plot_profiles(real: Sequence[Nodule], synthetic: Sequence[Nodule], s: FidelitySettings, path: Path) -> None:
    """One panel per texture class (and all): the mean margin profiles of :func:`profile_curves`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = profile_bins(s)
    panels = profile_curves(real, synthetic, s)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True)
    styles = {"real A": ("C0", ":"), "real B": ("C0", "-"), "real": ("C0", "-"), "synthetic": ("C1", "-")}
    for ax, (cls, curves) in zip(axes, panels):
        for label, group in curves:
            color, line = styles[label]
            ax.plot(bins, mean_profile(group), line, color=color, marker=".", label=f"{label} (n={len(group)})")
        ax.axvline(0, color="grey", lw=0.8)
        missing = [k for k in ("real", "synthetic") if not any(label.startswith(k) for label, _ in curves)]
        ax.set_title(cls + "".join(f" (no {k})" for k in missing))
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
        axrow[0].set_title(label if group else f"{label}: none (n=0)", fontsize=8, loc="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
