"""HU by depth inside the nodules of a finished demo workdir: the real nodules (each nodule's first ROI,
``results/rois/*/*_n*_0_*``) against the lesion run's inserted ones (``results/synthetic/lesion/*_after``).

Depth k = the nodule voxels whose distance transform (in voxels) lies in [k - 1/2, k + 1/2); the last row pools
everything deeper. This is the script behind the "ε or v" table in docs/lesion-experiments.md;
``lesion.fidelity.core_mm`` gives the workflow's own core statistic.
Usage: ``python benchmarks/lesion_depth.py WORKDIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from lungddpm.io import read_volume
from lungddpm.preprocessing.layout import NODULE

DEPTHS = (1, 2, 3, 4)


def by_depth(pairs: list[tuple[Path, Path]], label: str) -> None:
    """Print pooled HU statistics of the nodules of (ct, layout) pairs, whole and per depth."""
    pooled: list[np.ndarray] = []
    sizes: list[int] = []
    layers: dict[int, list[np.ndarray]] = {k: [] for k in DEPTHS}
    for ct_path, layout_path in pairs:
        ct = read_volume(ct_path)[0].astype(np.float64)
        mask = read_volume(layout_path)[0] == NODULE
        if not mask.any():
            raise SystemExit(f"{layout_path}: no nodule label")
        depth = ndi.distance_transform_edt(mask)
        pooled.append(ct[mask])
        sizes.append(int(mask.sum()))
        for k in DEPTHS:
            sel = (depth >= k - 0.5) & ((depth < k + 0.5) if k < DEPTHS[-1] else True)
            layers[k].append(ct[sel])
    hu = np.concatenate(pooled)
    print(f"{label}: {len(pooled)} nodules, median {np.median(sizes):.0f} voxels, mean {hu.mean():.0f} HU, "
          f"SD {hu.std():.0f}, solid (>= -300 HU) {np.mean(hu >= -300):.2f}")  # fmt: skip
    for k in DEPTHS:
        v = np.concatenate(layers[k])
        if v.size:
            deeper = "+" if k == DEPTHS[-1] else " "
            print(f"  depth {k}{deeper}: {v.size} voxels, mean {v.mean():.0f} HU, SD {v.std():.0f}")


def main(workdir: Path) -> None:
    real = sorted(workdir.glob("results/rois/*/*_n*_0_ct.nii.gz"))
    synthetic = sorted(workdir.glob("results/synthetic/lesion/*_after.nii.gz"))
    if not real or not synthetic:
        raise SystemExit(f"{workdir}: no ROIs or no lesion run; run the demo workflow there first")
    by_depth([(p, p.with_name(p.name.replace("_ct.", "_layout."))) for p in real], "real")
    by_depth([(p, p.with_name(p.name.replace("_after.", "_layout."))) for p in synthetic], "synthetic")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
