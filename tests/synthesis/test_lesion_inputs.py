"""What a lesion item's provenance digests: the files it reads, the source CT it is pasted into among them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import REPO

from lungddpm.config import load_config
from lungddpm.io import files_sha256
from lungddpm.synthesis import lesion_run
from lungddpm.synthesis.lesion import item_inputs_sha256
from lungddpm.synthesis.plan import Item


def _case(root: Path) -> tuple[Path, Path, list[Path]]:
    """A case's rois.csv naming one nodule-free ROI, its preprocessed folder and its source CT and label map."""
    rois, pre, src = root / "rois" / "c1", root / "preprocessed" / "c1", root / "images"
    for folder in (rois, pre, src):
        folder.mkdir(parents=True)
    with open(rois / "rois.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["roi", "kind", "ct", "layout"])
        writer.writeheader()
        writer.writerow({"roi": "c1_f0", "kind": "free", "ct": "c1_f0_ct.nii.gz", "layout": "c1_f0_layout.nii.gz"})
    for path in (rois / "c1_f0_ct.nii.gz", rois / "c1_f0_layout.nii.gz", pre / "lung_fine.nii.gz"):
        path.write_bytes(path.name.encode())
    sources = [src / "c1.nii.gz", src / "c1_label.nii.gz"]
    for path in sources:
        path.write_bytes(b"\0" * 64)
    return rois / "rois.csv", pre, sources


def test_the_source_ct_is_part_of_an_items_inputs(tmp_path: Path) -> None:
    """A CT re-exported with changes outside every ROI kept the old digest: the item was skipped, its paste-back
    into the old CT kept."""
    table, pre, sources = _case(tmp_path)
    rois = table.parent
    before = item_inputs_sha256(table, pre)  # DICOM sources: no source file, the digest as before
    assert before == files_sha256([table, rois / "c1_f0_ct.nii.gz", rois / "c1_f0_layout.nii.gz",
                                   pre / "lung_fine.nii.gz"])  # fmt: skip
    digest = item_inputs_sha256(table, pre, sources)
    assert digest == files_sha256([table, rois / "c1_f0_ct.nii.gz", rois / "c1_f0_layout.nii.gz",
                                   pre / "lung_fine.nii.gz", *sources])  # fmt: skip
    assert digest == item_inputs_sha256(table, pre, [str(p) for p in sources])
    data = bytearray(sources[0].read_bytes())
    data[-1] ^= 1  # one byte of the CT, outside every ROI
    sources[0].write_bytes(bytes(data))
    assert item_inputs_sha256(table, pre, sources) not in (digest, before)


def test_a_shard_digests_each_cases_source_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table, pre, sources = _case(tmp_path)
    cfg = load_config(REPO / "config" / "config.yaml")
    seen: list[tuple[Path, Path, list[str]]] = []

    def digest(table: Path, preprocessed: Path, sources: list[str] = []) -> str:  # noqa: B006
        seen.append((table, preprocessed, list(sources)))
        return "digest"

    setup = (None, None, torch.device("cpu"), (-1000, 400), [0.0], [], {"ema": {}})  # model .. checkpoint
    monkeypatch.setattr(lesion_run, "_setup", lambda *a: setup)
    monkeypatch.setattr(lesion_run, "file_sha256", lambda path: "sha")
    monkeypatch.setattr(lesion_run, "read_sites", lambda table: [])
    monkeypatch.setattr(lesion_run, "source_paths", lambda c, case: sources if case == "c1" else [])
    monkeypatch.setattr(lesion_run, "item_inputs_sha256", digest)
    monkeypatch.setattr(lesion_run, "provenance_complete", lambda files, settings: True)  # every item skipped
    monkeypatch.setattr(lesion_run, "inpaint", lambda model, diffusion, ins, *a, **k: [])
    items = [Item("lesion", "c1", k, k) for k in range(2)]
    out = lesion_run.synthesize_lesion_shard(
        items, cfg, tmp_path / "ckpt.pt", {"c1": table}, {"c1": pre}, tmp_path / "bank.npz", tmp_path / "out"
    )
    assert [e["skipped"] for e in out] == [True, True]
    assert seen == [(table, pre, sources)]  # once per case, with its source files


def test_an_irregular_case_fails_the_shard_after_its_other_items_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slice check runs at the paste-back, after the shard's sampling: the shard's other items are written (a
    rerun keeps them and samples only the refused case's again), then the shard fails naming the case."""
    from lungddpm.errors import DicomError

    cfg = load_config(REPO / "config" / "config.yaml")
    setup = (None, None, torch.device("cpu"), (-1000, 400), [0.0], [], {"ema": {}})  # model .. checkpoint
    for name, stand_in in (("_setup", lambda *a: setup), ("file_sha256", lambda path: "sha"),
                           ("read_sites", lambda table: []), ("source_paths", lambda c, case: []),
                           ("item_inputs_sha256", lambda *a: "digest"), ("inpaint", lambda *a, **k: []),
                           ("provenance_complete", lambda files, settings: False),
                           ("load_source", lambda case, *a: case)):  # fmt: skip
        monkeypatch.setattr(lesion_run, name, stand_in)

    def write(item: Item, src: str, *args: object) -> list[dict[str, object]]:
        if src == "c1":
            raise DicomError("c1: slices are irregularly spaced")
        return []

    monkeypatch.setattr(lesion_run, "_write_item", write)
    items = [Item("lesion", c, 0, n) for n, c in enumerate(("c1", "c2"))]  # the refused case first
    cases = {"c1": tmp_path / "t.csv", "c2": tmp_path / "t.csv"}
    with pytest.raises(DicomError, match="c1: slices are irregularly spaced"):
        lesion_run.synthesize_lesion_shard(items, cfg, tmp_path / "ckpt.pt", cases, cases, tmp_path / "b.npz",
                                           tmp_path)  # fmt: skip
    assert (tmp_path / f"{items[1].name}.json").is_file() and not (tmp_path / f"{items[0].name}.json").exists()
    # a case's items in a row read its CT once (each item read it again, and the last case's CT was still held
    # while the next was read: two native CTs at the peak)
    loads: list[str] = []
    monkeypatch.setattr(lesion_run, "load_source", lambda case, *a: loads.append(case) or case)
    monkeypatch.setattr(lesion_run, "_write_item", lambda *a: [])
    items = [Item("lesion", c, k, n) for n, (c, k) in enumerate((("c1", 0), ("c1", 1), ("c2", 0), ("c2", 1)))]
    lesion_run.synthesize_lesion_shard(items, cfg, tmp_path / "ckpt.pt", cases, cases, tmp_path / "b.npz", tmp_path)
    assert loads == ["c1", "c2"]

    # a resumed shard (the middle item complete) lists its items in their order, not the skipped ones first: the
    # report shows the montages of the first items it lists
    monkeypatch.setattr(lesion_run, "provenance_complete", lambda files, settings: "c2_0" in files["provenance"].name)
    out = lesion_run.synthesize_lesion_shard(items[1:], cfg, tmp_path / "ckpt.pt", cases, cases, tmp_path / "b.npz",
                                             tmp_path)  # fmt: skip
    assert [(e["item"], e["skipped"]) for e in out] == [(it.name, it.name.endswith("c2_0")) for it in items[1:]]
    assert sum(e["skipped"] for e in out) == 1


def test_the_native_geometry_refuses_slices_that_drift_off_the_written_grid() -> None:
    """Each step within 1 % of the median passed, yet 130 steps of 2.52 mm after 150 of 2.5 put the last slices
    2.6 mm (a slice) off the regular grid the pasted CT's NIfTI states; now each slice's position is checked."""
    from dataclasses import replace

    import numpy as np
    from support import source_ct

    from lungddpm.errors import DicomError
    from lungddpm.preprocessing.grid import SliceGrid

    src = source_ct()
    drifting = np.concatenate([np.arange(151) * 2.5, 375 + np.arange(1, 131) * 2.52])
    with pytest.raises(DicomError, match=r"LIDC-IDRI-0001: slices are irregularly spaced .* 2.60 mm off a regular"):
        lesion_run.native_geometry(replace(src, grid=SliceGrid(drifting, 1.0, 1.0, 0.0, 0.0)))
    jitter = np.arange(281) * 0.45 + np.arange(281) * 0.000012  # LIDC-IDRI-0490: 0.007 mm off at the end
    assert lesion_run.native_geometry(replace(src, grid=SliceGrid(jitter, 1.0, 1.0, 0.0, 0.0))).spacing[0] == (
        pytest.approx(0.45, abs=1e-4)
    )


def test_a_site_layout_with_labels_beyond_the_convention_is_refused_by_file_when_read(tmp_path: Path) -> None:
    """A free ROI's layout holding a 3 was refused only when the shard's sites were inpainted (every site placed
    first), naming the ROI (`c1_f0`) and saying "rerun the layout stage"; now its file and the rois rule."""
    import numpy as np

    from lungddpm.errors import LayoutError
    from lungddpm.io import Geometry, write_volume
    from lungddpm.synthesis.lesion import read_sites

    table, _, _ = _case(tmp_path)
    geometry = Geometry(spacing=(1.25, 1.25, 1.25), origin=(0.0, 0.0, 0.0))
    layout = np.ones((8, 8, 8), np.uint8)
    write_volume(table.parent / "c1_f0_ct.nii.gz", np.full((8, 8, 8), -800, np.int16), geometry)
    write_volume(table.parent / "c1_f0_layout.nii.gz", layout, geometry)
    assert [s.name for s in read_sites(table)] == ["c1_f0"]
    layout[2, 2, 2] = 3
    write_volume(table.parent / "c1_f0_layout.nii.gz", layout, geometry)
    with pytest.raises(LayoutError, match=r"c1_f0_layout.nii.gz: labels \[1, 3\] found.*rerun the rois rule"):
        read_sites(table)
