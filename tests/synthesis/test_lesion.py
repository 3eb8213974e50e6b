"""Lesion scale on tiny arrays: ROI cutting and edges, placement, inpainting determinism, paste-back and seams."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from support import INSERT, labelled_source_ct, lesion_bank, roi_settings, source_ct, toy_site

from lungddpm.config import lesion_config, load_config
from lungddpm.diffusion.encoding import ANY_TEXTURE, layout_to_channels, texture_class, texture_values
from lungddpm.diffusion.process import DiffusionConfig, GaussianDiffusion
from lungddpm.diffusion.unet import UNet3D, unet_config_from_dict
from lungddpm.errors import LayoutError, SamplingError
from lungddpm.io import read_volume, write_volume
from lungddpm.preprocessing.layout import LUNG, NODULE, face_border
from lungddpm.preprocessing.roi_training import focus_weights, roi_channels
from lungddpm.preprocessing.rois import SourceCT, cut_roi, extract_rois, shift_inside
from lungddpm.synthesis.layout_edit import place_at
from lungddpm.synthesis.lesion import Site, inpaint, place
from lungddpm.synthesis.paste import (
    feather_weight,
    native_box,
    native_labels,
    nearest_in_box,
    nodule_in_box,
    paste_back,
    seam_gradient_ratio,
)


def test_texture_classes_and_channel_levels() -> None:
    assert [texture_class(r) for r in range(1, 6)] == [0, 0, 1, 2, 2]
    layout = np.array([[[0, 1, 2]]], np.uint8)
    ch = layout_to_channels(layout, nodule_level=np.full(layout.shape, 0.25, np.float32))
    assert ch[:, 0, 0].tolist() == [[-1, 1, -1], [-1, -1, 0.25]]
    assert layout_to_channels(layout)[1, 0, 0, 2] == ANY_TEXTURE  # the whole-volume scale's only level


def test_shift_inside_and_edge_policy(tmp_path) -> None:
    lo, hi = np.zeros(3), np.array([63.0, 63.0, 58.5])
    assert shift_inside(np.array([2.0, 60.0, 30.0]), 7.5, lo, hi).tolist() == [7.5, 55.5, 30.0]
    src = source_ct()
    # a 48 mm ROI in a 58.5 mm-tall scan fits; a 64 mm one cannot: pad (recorded) or refuse (named)
    nod_src = SourceCT(src.case_id, src.hu, src.grid, src.lung_fine, src.fine, [], src.padding_hu)
    rows = extract_rois(nod_src, roi_settings(size=64, free_per_case=0), tmp_path / "a")
    assert rows == []
    with pytest.raises(LayoutError, match=r"LIDC-IDRI-0001: found 0 of lesion.roi.free_per_case=1.*lower"):
        extract_rois(src, roi_settings(size=64), tmp_path / "b")


def test_cut_roi_pads_outside_the_scan_with_padding_hu() -> None:
    src = source_ct()
    s = roi_settings(size=16)
    roi = cut_roi(src, s.geometry(np.array([32.0, 32.0, -2.0])), s)  # partly below the first slice
    assert (roi["ct"][:4] == -1024).all() and (roi["ct"][-1] != -1024).any()


def test_roi_refuses_an_roi_crossing_the_edge(tmp_path, monkeypatch) -> None:
    from lungddpm.preprocessing import rois

    src = source_ct()
    monkeypatch.setattr(rois, "free_sites", lambda *a, **k: [np.array([32.0, 32.0, 0.0])])
    with pytest.raises(
        LayoutError, match=r"LIDC-IDRI-0001: ROI LIDC-IDRI-0001_f0 .* crosses the scan's edge.*edge: pad"
    ):
        extract_rois(src, roi_settings(size=64, edge="refuse"), tmp_path)
    rows = extract_rois(src, roi_settings(size=64, edge="pad"), tmp_path)
    assert rows[0]["padded_voxels"] > 0


def test_place_inside_lung_with_margin_and_errors() -> None:
    src = source_ct()
    site = toy_site(src)
    ins = place("LIDC-IDRI-0001", site, lesion_bank(), 3, INSERT, (0.25, 0.5, 0.75), "bank")
    assert ins.nodule.sum() > 0 and (site.layout[ins.nodule] == LUNG).all()  # wholly inside the lung
    assert (ins.layout[ins.nodule] == NODULE).all() and (ins.layout[~ins.nodule] == site.layout[~ins.nodule]).all()
    assert ins.generated[ins.nodule].all() and ins.generated.sum() > ins.nodule.sum()
    assert ins.level == 0.75 and ins.record["texture_requested"] == "solid"
    assert place("LIDC-IDRI-0001", site, lesion_bank(), 3, INSERT, (0.25, 0.5, 0.75), "ground-glass").level == 0.25
    with pytest.raises(LayoutError, match=r"LIDC-IDRI-0001: no bank nodule matches lesion.insert.*widen"):
        place("LIDC-IDRI-0001", site, [], 3, INSERT, (0.25, 0.5, 0.75), "bank")
    tight = Site(site.name, site.ct, np.where(site.layout > 0, 0, 0).astype(np.uint8), site.geometry)
    tight.layout[7:9, 7:9, 7:9] = LUNG
    with pytest.raises(LayoutError, match=r"LIDC-IDRI-0001: site LIDC-IDRI-0001_f0 has no room .*lower"):
        place("LIDC-IDRI-0001", tight, lesion_bank(), 3, INSERT, (0.25, 0.5, 0.75), "bank")


def _faces(mask: np.ndarray) -> int:
    return sum(int(mask.take(k, axis=a).sum()) for a in range(3) for k in (0, -1))


def test_the_generated_region_stays_off_the_roi_faces_so_the_paste_back_weight_is_zero_there() -> None:
    site = toy_site(source_ct())  # lung over the whole 16 mm ROI: a nodule could go anywhere
    assert _faces(site.layout > 0) > 0
    inserts = [
        place("LIDC-IDRI-0001", site, lesion_bank(), seed, INSERT, (0.25, 0.5, 0.75), "bank") for seed in range(12)
    ]
    assert all(_faces(ins.generated) == 0 for ins in inserts)
    assert all(_faces(feather_weight(ins.generated, 1.0, INSERT["feather_mm"])) == 0 for ins in inserts)
    edge = Site(site.name, site.ct, np.zeros_like(site.layout), site.geometry)
    edge.layout[:, :, :6] = LUNG  # room for a nodule only along one face
    with pytest.raises(LayoutError, match=r"site LIDC-IDRI-0001_f0 has no room"):
        place("LIDC-IDRI-0001", edge, lesion_bank(), 0, INSERT, (0.25, 0.5, 0.75), "bank")
    nod = lesion_bank()[0]
    with pytest.raises(LayoutError, match=r"does not fit .* with 3 voxel\(s\) to its faces"):
        place_at(site.layout, site.geometry, nod, (8.0, 8.0, 1.0), face_border(INSERT["margin_mm"], 1.0))
    assert (place_at(site.layout, site.geometry, nod, (8.0, 8.0, 8.0), 3)[0] == NODULE).any()


def _tiny_model() -> tuple[UNet3D, GaussianDiffusion]:
    torch.manual_seed(0)
    cfg = {
        "model_channels": 8,
        "channel_mult": [1, 2],
        "attention_resolutions": [],
        "norm_groups": 4,
        "num_res_blocks": 1,
        "num_heads": 1,
        "dropout": 0.0,
        "use_checkpoint": False,
    }
    return UNet3D(unet_config_from_dict(cfg, image_size=16)).eval(), GaussianDiffusion(DiffusionConfig(timesteps=50))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_inpaint_keeps_roi_outside_generated_region_and_is_seeded(sampler: str) -> None:
    src = source_ct()
    sites = [toy_site(src), toy_site(src, (30.0, 34.0, 28.0))]
    levels = (0.25, 0.5, 0.75)
    ins = [place("LIDC-IDRI-0001", s, lesion_bank(), 10 + j, INSERT, levels, "bank") for j, s in enumerate(sites)]
    model, diffusion = _tiny_model()
    sc = {
        "batch_size": 2,
        "precision": "fp32",
        "sampler": sampler,
        "steps": 4,
        "clip_x0": True,
        "guidance": 1.0,
        "jump_length": 0,
        "jump_n_sample": 1,
        "timestep_spacing": "trailing",
    }
    a = inpaint(model, diffusion, ins, (-1000.0, 400.0), sc, torch.device("cpu"))
    b = inpaint(model, diffusion, ins[1:], (-1000.0, 400.0), {**sc, "batch_size": 1}, torch.device("cpu"))
    for c, after in zip(ins, a):
        assert after.dtype == np.int16
        assert np.array_equal(after[~c.generated], c.site.ct[~c.generated])
        assert not np.array_equal(after[c.generated], c.site.ct[c.generated])
    assert np.array_equal(a[1], b[0])  # same seed, same ROI, batched or alone
    for p in model.parameters():  # weights that are not finite: the sites named, nothing returned
        p.data.fill_(float("nan"))
    names = rf"sites {ins[0].site.name}, {ins[1].site.name}: volume\(s\) \[0, 1\] of the batch of 2 came out not finite"
    with pytest.raises(SamplingError, match=names + r".* \(lesion.sample.precision: fp32\)$"):
        inpaint(model, diffusion, ins, (-1000.0, 400.0), sc, torch.device("cpu"))


def test_paste_back_changes_only_the_generated_region_and_is_seamless() -> None:
    src = source_ct()
    site = toy_site(src)
    ins = place("LIDC-IDRI-0001", site, lesion_bank(), 3, {**INSERT, "margin_mm": 3.0}, (0.25, 0.5, 0.75), "bank")
    after = site.ct.copy()
    after[ins.nodule] = 30  # a solid nodule; the margin keeps the lung's own values (a well-matched generator)
    native = src.hu.astype(np.int16)
    before = native.copy()
    box = native_box(src.grid, native.shape, site.geometry, 16)
    w_roi = feather_weight(ins.generated, 1.0, 2.0)
    assert w_roi[~ins.generated].max() == 0 and w_roi.max() == 1
    w, changed = paste_back(native, box, after, w_roi)
    diff = native != before
    assert changed > 0 and diff.sum() == changed  # the voxels whose value changed (not those of weight > 0)
    outside = np.ones(native.shape, bool)
    outside[box.slices] = ~nearest_in_box(box, ins.generated)  # native voxels nearest to a kept ROI voxel
    assert np.array_equal(native[outside], before[outside])  # bit-identical outside the generated region
    assert (w[~outside[box.slices]] > 0).any() and (w[outside[box.slices]] == 0).all()
    spacing = (1.5, 1.0, 1.0)
    lung = src.hu > -1000
    lung[:, :4] = lung[:, -4:] = False
    ratio = seam_gradient_ratio(native, spacing, w, box, lung)
    assert ratio <= 1.2, ratio
    # a cube pasted without feathering shows its edge
    cube = np.zeros_like(ins.generated)
    cube[4:12, 4:12, 4:12] = True
    hard = before.copy()
    gen = site.ct.copy()
    gen[cube] = -500
    w2, _ = paste_back(hard, box, gen, feather_weight(cube, 1.0, 0.0))
    assert seam_gradient_ratio(hard, spacing, w2, box, lung) > 1.2
    assert set(np.unique(w2).tolist()) == {0.0, 1.0}  # feather_mm 0: a hard paste (interpolated, 0.3-0.9 at edges)
    assert np.array_equal(w2 > 0, nearest_in_box(box, cube))


def test_a_thin_new_nodule_between_native_slices_keeps_its_native_label() -> None:
    """2.5 mm native slices under a 1.25 mm ROI: ROI slice 15 lies between two native slices, so no native voxel's
    nearest ROI voxel is on it; a one-voxel nodule there had no native label although its HU was pasted."""
    from lungddpm.io import Geometry
    from lungddpm.preprocessing.grid import SliceGrid

    grid = SliceGrid(np.arange(0, 60, 2.5), 1.0, 1.0, 0.0, 0.0)
    roi = Geometry(spacing=(1.25, 1.25, 1.25), origin=(10.0, 10.0, 0.625))
    box = native_box(grid, (24, 64, 64), roi, 32)
    nodule = np.zeros((32, 32, 32), bool)
    nodule[15, 16, 16] = True
    assert not nearest_in_box(box, nodule).any()  # the old lookup: no label at all
    assert nodule_in_box(box, grid, roi, nodule, 0.5).sum() == 1  # its centroid's voxel
    ball = np.zeros((32, 32, 32), bool)
    zz, yy, xx = np.indices(ball.shape)
    ball[((zz - 15) ** 2 + (yy - 16) ** 2 + (xx - 16) ** 2) <= 9] = True  # 7.5 mm across
    native = nodule_in_box(box, grid, roi, ball, 0.5)
    assert native.sum() * 2.5 == pytest.approx(ball.sum() * 1.25**3, rel=0.25)  # its volume, at 1 mm x 2.5 mm


@pytest.mark.parametrize("slice_mm", [2.5, 0.7])
def test_every_native_voxel_labelled_as_the_new_nodule_is_wholly_generated(slice_mm: float) -> None:
    """The demo's paste (1.25 mm ROI, margin 3.75, feather 2.5 mm: a weight of 1 on every ROI voxel of the nodule)
    interpolated the weight onto the native grid, so a labelled rim voxel between a nodule voxel and a feathered one
    kept 5-15 % of the source HU (111 of 414 labelled voxels at 2.5 mm slices, 424 of 1517 at 0.7 mm)."""
    from lungddpm.io import Geometry
    from lungddpm.preprocessing.grid import SliceGrid
    from lungddpm.preprocessing.layout import dilate_mm

    grid = SliceGrid(np.arange(0, 80, slice_mm), 0.7, 0.7, 0.0, 0.0)
    roi = Geometry(spacing=(1.25, 1.25, 1.25), origin=(19.7, 19.9, 19.8))
    zz, yy, xx = np.indices((32, 32, 32))
    nodule = ((zz - 15.3) ** 2 + (yy - 16.1) ** 2 + (xx - 15.7) ** 2) <= 16  # 10 mm across
    generated = dilate_mm(nodule, 3.75, 1.25)
    after = np.where(nodule, 40, -800).astype(np.int16)
    native = np.full((len(grid.z_positions), 100, 100), -800, np.int16)
    box = native_box(grid, native.shape, roi, 32)
    new = nodule_in_box(box, grid, roi, nodule, 0.5)
    w_roi = feather_weight(generated, 1.25, 2.5)
    assert w_roi[nodule].min() == 1.0
    w_old, _ = paste_back(native.copy(), box, after, w_roi)
    assert (w_old[new] < 1).sum() > 0.1 * new.sum()  # the interpolated weight alone
    w, changed = paste_back(native, box, after, w_roi, whole=new)
    assert new.sum() > 100 and w[new].min() == 1.0 and changed > 0
    assert np.array_equal(w[~new], w_old[~new])  # the feathered rim is unchanged
    native_after = native[box.slices]
    assert (native_after[new] > -800).all()  # every labelled voxel carries the generated HU, not the source's


def test_a_hard_paste_rounds_half_up_so_its_extent_does_not_depend_on_parity() -> None:
    """feather_mm 0 pastes each native voxel by its nearest ROI voxel; native centres halfway between ROI voxels (a
    site on the 2 mm fine grid over 1.25 mm slices) were decided by np.round's half to even: a 5-slice region pasted
    as 4 or 6 native slices by its index parity."""
    from lungddpm.io import Geometry
    from lungddpm.preprocessing.grid import SliceGrid

    grid = SliceGrid(np.arange(30) * 1.25, 1.25, 1.25, 0.0, 0.0)
    roi = Geometry(spacing=(1.25, 1.25, 1.25), origin=(0.625, 0.625, 0.625))
    box = native_box(grid, (30, 40, 40), roi, 16)
    for lo in (5, 6):
        generated = np.zeros((16, 16, 16), bool)
        generated[lo : lo + 5, 4:12, 4:12] = True
        native = np.zeros((30, 40, 40), np.int16)
        paste_back(native, box, np.where(generated, 100, 0).astype(np.int16), feather_weight(generated, 1.25, 0.0))
        assert np.flatnonzero(native.any(axis=(1, 2))).tolist() == list(range(lo, lo + 5))


def test_focus_weights_cover_nodule_and_margin() -> None:
    layout = np.ones((9, 9, 9), np.uint8)
    layout[4, 4, 4] = NODULE
    w = focus_weights(layout, 1.0, 2.0, 2.0)
    assert w[4, 4, 4] == 3.0 and w[4, 4, 6] == 3.0 and w[4, 4, 7] == 1.0 and w[0, 0, 0] == 1.0
    # every voxel within the margin, not within a whole number of voxels (the demo's 3 mm at 1.25 mm was 2 voxels:
    # 2.5 mm; 3.2 mm was 3 voxels: 3.75 mm)
    zz, yy, xx = np.indices(layout.shape)
    for margin in (3.0, 3.2, 0.5):
        within = (((zz - 4) ** 2 + (yy - 4) ** 2 + (xx - 4) ** 2) * 1.25**2) <= margin**2
        assert np.array_equal(focus_weights(layout, 1.25, 2.0, margin) == 3.0, within)


def test_lesion_config_merges_overrides_and_names_bad_keys(tmp_path) -> None:
    from lungddpm.errors import ConfigError

    cfg = load_config("config/config.yaml")
    lc = lesion_config(cfg)
    assert lc.preprocess.size == (32, 32, 32) and lc.preprocess.spacing_mm == (1.25, 1.25, 1.25)
    assert lc.model["model_channels"] == 16 and lc.train.focus_weight == 2.0 and lc.train.name == "demo"
    assert cfg.model["model_channels"] == 24  # the whole-volume model is untouched
    with pytest.raises(ConfigError, match=r"lesion.train: Additional properties are not allowed \('stepz'"):
        load_config("config/config.yaml", {"lesion": {"train": {"stepz": 3}}})  # with the whole config, as its section
    v = load_config("config/config.yaml", {"lesion": {"diffusion": {"prediction": "v"}}, "diffusion": {"loss": "l2"}})
    assert lesion_config(v).diffusion == {**v.diffusion, "prediction": "v"} and v.diffusion["prediction"] == "epsilon"
    assert lesion_config(v).diffusion["loss"] == "l2"  # keys it does not name come from the diffusion section
    with pytest.raises(ConfigError, match=r"lesion.diffusion: Additional properties .*\('predictionz'"):
        load_config("config/config.yaml", {"lesion": {"diffusion": {"predictionz": "v"}}})


def test_guidance_with_an_identical_uncond_layout_changes_nothing() -> None:
    from lungddpm.diffusion.sample import sample

    model, diffusion = _tiny_model()
    with torch.no_grad():  # the output layer starts at zero; give the network a response to its layout input
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    layout = torch.from_numpy(np.stack([np.ones((16, 16, 16)), -np.ones((16, 16, 16))]).astype(np.float32))[None]
    kw = {"clip_x0": False}  # a random network saturates clipped samples
    plain = sample(model, diffusion, layout, "dpm++", 3, torch.Generator().manual_seed(1), **kw)
    same = sample(model, diffusion, layout, "dpm++", 3, torch.Generator().manual_seed(1), guidance=4.0,
                  uncond_layout=layout, **kw)  # fmt: skip
    other = sample(model, diffusion, layout, "dpm++", 3, torch.Generator().manual_seed(1), guidance=4.0,
                   uncond_layout=-layout, **kw)  # fmt: skip
    # cond == uncond: the guided output is the plain one (up to batched-convolution rounding); otherwise it moves
    assert (plain - same).abs().max() < 1e-4 * (plain - other).abs().max()
    with pytest.raises(ValueError, match="guidance 4.0 needs uncond_layout"):  # not silently unguided
        sample(model, diffusion, layout, "dpm++", 3, torch.Generator().manual_seed(1), guidance=4.0, **kw)


def test_another_nodule_in_the_site_keeps_its_own_class_while_the_new_one_gets_its_level() -> None:
    """A studio site may hold a nodule inserted before, or a real one: it was given the new nodule's texture level
    (all NODULE voxels got one scalar: a ground-glass neighbour told solid); now it gets its own class's level where
    known, else "any texture", as training gives them, and the new nodule alone carries the level asked for."""
    from lungddpm.synthesis.lesion import Insertion, _network_layouts

    layout = np.full((8, 8, 8), LUNG, np.uint8)
    new = np.zeros(layout.shape, bool)
    new[2:4, 2:4, 2:4] = True
    layout[new] = NODULE
    layout[5:7, 5:7, 5:7] = NODULE  # the other nodule
    site = Site("s", np.zeros(layout.shape, np.int16), layout, None)
    ins = Insertion(site, layout, new, new, -0.3, {}, 0)
    channels = _network_layouts([ins, ins], [-0.3, 0.4], [])[:, 1].numpy()
    assert channels.shape == (2, 8, 8, 8)
    assert (channels[0][new] == np.float32(-0.3)).all() and (channels[1][new] == np.float32(0.4)).all()
    assert (channels[:, 5:7, 5:7, 5:7] == ANY_TEXTURE).all() and (channels[:, layout == LUNG] == -1.0).all()
    # a neighbour of known class (the studio's: a real LIDC nodule's texture map, or the class asked for an earlier
    # insertion) gets that class's level, as roi_channels gives it in training
    levels = (-0.4, -0.2, 0.1)
    known = np.zeros(layout.shape, np.uint8)
    known[5:7, 5:7, 5:7] = 1 + 0  # ground-glass
    ins = replace(ins, site=replace(site, texture=known), others=texture_values(known, levels))
    channels = _network_layouts([ins], [0.1], [])[0, 1].numpy()
    assert (channels[5:7, 5:7, 5:7] == np.float32(-0.4)).all() and (channels[new] == np.float32(0.1)).all()
    assert np.array_equal(channels, roi_channels(layout, np.where(new, 3, known), levels, "s")[1])


def test_step_batches_balance_dropout_and_flips_are_seeded_and_aligned() -> None:
    from lungddpm.diffusion.data import StepBatches, TrainData

    n = 8
    images = torch.arange(n * 4**3, dtype=torch.float32).reshape(n, 1, 4, 4, 4)
    layouts = torch.full((n, 2, 4, 4, 4), -1.0)
    layouts[:, 1, 1:3, 1:3, 1:3] = 0.25
    layouts[:, 0] = images[:, 0] / 1000  # a layout channel that follows the image, to check flips stay aligned
    groups = ("solid",) * 6 + ("ground-glass", "free")
    data = TrainData(images, layouts, tuple(map(str, range(n))), torch.ones(n, 1, 4, 4, 4), groups)
    sb = StepBatches(data, 0, 4, 1, 0, 1, 50, 0, 300, cond_dropout=0.5, flip=True, balance=True)
    seen = {"solid": 0, "ground-glass": 0, "free": 0}
    dropped = 0
    for i in range(300):
        micro = sb[i][0]
        assert torch.allclose(micro["layout"][:, 0], micro["x0"][:, 0] / 1000)  # flipped together
        for b in range(4):
            case = int(micro["x0"][b].min() // 64)
            seen[groups[case]] += 1
            dropped += int((micro["layout"][b, 1] == 1.0).any())
    assert all(abs(v / 1200 - 1 / 3) < 0.05 for v in seen.values()), seen  # each group equally often
    assert 0.4 < dropped / 1200 < 0.6
    again = StepBatches(data, 0, 4, 1, 0, 1, 50, 0, 300, cond_dropout=0.5, flip=True, balance=True)
    assert all(torch.equal(a, b) for a, b in zip(sb[17][0].values(), again[17][0].values()))


def test_cond_dropout_drops_every_texture_class_to_any_texture() -> None:
    # the default texture levels (about -0.36, 0.0, 0.43) all lie above the channel's -1: each class is dropped, not
    # only solid, so the unconditional pass of the guidance learns from every class
    from lungddpm.diffusion.data import StepBatches, TrainData
    from lungddpm.diffusion.encoding import texture_levels

    levels = texture_levels([-550, -300, 0], (-1000, 400))  # lesion.texture_hu, intensity.hu_window defaults
    assert min(levels) < 0 < max(levels)
    layouts = torch.full((3, 2, 4, 4, 4), -1.0)
    layouts[:, 0, :2] = 1.0  # lung
    for c, level in enumerate(levels):
        layouts[c, 1, 1:3, 1:3, 1:3] = level
    images = torch.arange(3.0).view(3, 1, 1, 1, 1).expand(3, 1, 4, 4, 4)  # a sample's case = its image value
    data = TrainData(images, layouts, ("ground-glass", "part-solid", "solid"))
    always = StepBatches(data, 0, 4, 1, 0, 1, 50, 0, 20, cond_dropout=1.0)
    never = StepBatches(data, 0, 4, 1, 0, 1, 50, 0, 20, cond_dropout=0.0)
    seen = set()
    for i in range(20):
        a, b = always[i][0], never[i][0]
        cases = b["x0"][:, 0, 0, 0, 0].long()
        seen.update(cases.tolist())
        nodule = layouts[cases, 1] > -1
        assert torch.equal(b["layout"], layouts[cases])  # cond_dropout 0: unchanged
        assert torch.equal(a["layout"][:, 1][nodule], torch.full((int(nodule.sum()),), ANY_TEXTURE))  # every voxel
        assert torch.equal(a["layout"][:, 1][~nodule], torch.full((int((~nodule).sum()),), -1.0))  # background
        assert torch.equal(a["layout"][:, 0], b["layout"][:, 0])  # the lung channel untouched
        assert torch.equal(a["t"], b["t"]) and torch.equal(a["noise"], b["noise"])  # the dropout is drawn after them
    assert seen == {0, 1, 2}


def test_step_batches_crop_one_window_of_every_tensor_and_keep_timesteps() -> None:
    from lungddpm.diffusion.data import StepBatches, TrainData
    from lungddpm.errors import LungDDPMError

    n, e = 3, 8
    images = torch.arange(n * e**3, dtype=torch.float32).reshape(n, 1, e, e, e)  # a voxel's value = its index
    data = TrainData(images, torch.cat([images, -images], 1), ("a", "b", "c"), images * 2)
    full = StepBatches(data, 0, 4, 1, 0, 1, 50, 0, 20, flip=True)
    cropped = StepBatches(data, 0, 4, 1, 0, 1, 50, 0, 20, flip=True, crop=4)
    corners = set()
    for i in range(20):
        a, b = full[i][0], cropped[i][0]
        assert b["x0"].shape == b["noise"].shape == b["weight"].shape == (4, 1, 4, 4, 4)
        assert torch.equal(a["t"], b["t"])  # the crop is drawn last: timesteps and noise draws unchanged
        assert torch.equal(b["layout"], torch.cat([b["x0"], -b["x0"]], 1)) and torch.equal(b["weight"], 2 * b["x0"])
        for j in range(4):
            # find the window in the full (flipped) sample by the voxel values; the noise is the same window
            hits = [(z, y, x) for z in range(5) for y in range(5) for x in range(5)
                    if torch.equal(a["x0"][j, :, z:z + 4, y:y + 4, x:x + 4], b["x0"][j])]  # fmt: skip
            assert len(hits) == 1
            z, y, x = hits[0]
            assert torch.equal(a["noise"][j, :, z : z + 4, y : y + 4, x : x + 4], b["noise"][j])
            corners.add(hits[0])
    assert len(corners) > 20  # windows are spread over the grid
    with pytest.raises(LungDDPMError, match="train.crop 16 is larger than the training grid"):
        StepBatches(data, 0, 4, 1, 0, 1, 50, 0, 20, crop=16)


def test_lesion_plan_items_are_seeded_per_case() -> None:
    from lungddpm.synthesis.plan import lesion_plan, shard

    items = lesion_plan(["LIDC-IDRI-0002", "LIDC-IDRI-0001"], 2, 0)
    assert [it.name for it in items] == ["LIDC-IDRI-0001_0", "LIDC-IDRI-0001_1", "LIDC-IDRI-0002_0", "LIDC-IDRI-0002_1"]
    assert len({it.seed for it in items}) == 4 and items == lesion_plan(["LIDC-IDRI-0001", "LIDC-IDRI-0002"], 2, 0)
    assert sorted(shard(items, 2, 0) + shard(items, 2, 1), key=lambda it: it.name) == items


def test_repaint_resampling_schedule_and_sampler_check() -> None:
    from lungddpm.diffusion.sample import Blend, Resample, sample

    model, diffusion = _tiny_model()
    calls = []

    def counting(x: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        return model(x, t, layout)

    layout = torch.from_numpy(np.stack([np.ones((16, 16, 16)), -np.ones((16, 16, 16))]).astype(np.float32))[None]
    keep = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool)
    keep[..., :8] = True
    ref = torch.full((1, 1, 16, 16, 16), -0.5)
    x = sample(counting, diffusion, layout, "ddim", 4, torch.Generator().manual_seed(0), blend=Blend(ref, keep),
               resample=Resample(2, 2))  # fmt: skip
    # RePaint's jumps aligned with the last call: steps 0, 1, 2, back to 1, 2, then 3
    assert len(calls) == 6 and calls[3] == calls[1] and calls[4] == calls[2] and len(set(calls)) == 4
    assert torch.equal(x[keep], ref[keep])
    with pytest.raises(ValueError, match="single-step sampler"):
        sample(model, diffusion, layout, "dpm++", 4, torch.Generator().manual_seed(0), resample=Resample(2, 2))


def test_a_whole_volume_checkpoint_is_refused_for_the_lesion_run(tmp_path) -> None:
    from lungddpm.diffusion.checkpoint import CheckpointError
    from lungddpm.synthesis.lesion import load_lesion_model

    model, _ = _tiny_model()
    weights = model.state_dict()
    ckpt = {
        "ema": weights,
        "model": weights,
        "unet": dict(vars(model.cfg)),
        "size": [32] * 3,
        "hu_window": [-1000, 400],
    }
    roi = {"size": 16, "spacing_mm": 1.25}
    ckpt |= {"diffusion": {"timesteps": 50}, "config": {"lesion": {"roi": roi}}, "spacing_mm": [1.25] * 3}
    torch.save(ckpt, tmp_path / "checkpoint.pt")  # trained at 32^3, ROIs 16^3
    with pytest.raises(CheckpointError, match=r"not a lesion-scale model.*train_lesion"):
        load_lesion_model(tmp_path / "checkpoint.pt", {"sample": {"use_ema": True, "compile": True}, "roi": roi})
    # the demo's grids: a whole-volume model of 32^3 at 10 mm beside 32^3 ROIs at 1.25 mm (the grid alone matched)
    ckpt |= {"config": {"lesion": {"roi": {**roi, "size": 32}}}, "spacing_mm": [10.0] * 3}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"its grid \[32, 32, 32\] at \[10.0, 10.0, 10.0\] mm is not lesion.roi's "
                       r"\[32, 32, 32\] at \[1.25, 1.25, 1.25\] mm: a whole-volume model\?"):  # fmt: skip
        load_lesion_model(tmp_path / "checkpoint.pt", {"sample": {"use_ema": True, "compile": True}, "roi": roi})
    # a lesion model trained on other ROIs than the config cuts now (kept past a change: --allowed-rules, --touch)
    ckpt |= {"size": [16] * 3, "spacing_mm": [1.25] * 3, "config": {"lesion": {"roi": roi}}}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"lesion.roi.spacing_mm is 1.0 here, 1.25 in training: ROIs would be "
                       r"cut at a scale .*`snakemake --cores all results/models/lesion/.*/checkpoint.pt`"):  # fmt: skip
        load_lesion_model(tmp_path / "checkpoint.pt", {"sample": {"use_ema": True, "compile": False},
                                                        "roi": {**roi, "spacing_mm": 1.0}})  # fmt: skip


def test_lesion_sample_compile_wraps_the_loaded_weights_and_stays_out_of_provenance(tmp_path) -> None:
    """lesion.sample.compile: the same weights behind torch.compile (lazy: compiling starts at the first call), and
    items inpainted either way count as done (compile is how, not what, as batching and shards)."""
    from lungddpm.synthesis.lesion import load_lesion_model, run_settings

    model, _ = _tiny_model()
    weights = model.state_dict()
    ckpt = {"ema": weights, "model": weights, "unet": dict(vars(model.cfg)), "size": [16] * 3, "spacing_mm": [1.0] * 3}
    roi = {"size": 16, "spacing_mm": 1.0}
    ckpt |= {"hu_window": [-1000, 400], "diffusion": {"timesteps": 50}, "config": {"lesion": {"roi": roi}}}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    eager, *_ = load_lesion_model(
        tmp_path / "checkpoint.pt", {"sample": {"use_ema": True, "compile": False}, "roi": roi}
    )
    net, *_ = load_lesion_model(tmp_path / "checkpoint.pt", {"sample": {"use_ema": True, "compile": True}, "roi": roi})
    assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule) and not isinstance(eager, type(net))
    inner = net._orig_mod.state_dict()
    assert all(torch.equal(inner[k], v) for k, v in weights.items())
    how = ({"compile": False}, {"compile": True}, {"batch_size": 3}, {"shards": 5})  # never what a nodule is
    cfgs = [load_config("config/config.yaml", {"lesion": {"sample": h}}) for h in how]
    assert all(run_settings(c, "x") == run_settings(cfgs[0], "x") for c in cfgs)
    assert not {"compile", "batch_size", "shards"} & set(run_settings(cfgs[1], "x")["sample"])
    # more items per case: the items already made are kept (they were remade, byte-identical), and the rest made
    more = load_config("config/config.yaml", {"lesion": {"insert": {"samples_per_case": 3}}})
    assert run_settings(more, "x") == run_settings(cfgs[0], "x")
    margin = load_config("config/config.yaml", {"lesion": {"insert": {"margin_mm": 5.0}}})
    assert run_settings(margin, "x") != run_settings(cfgs[0], "x")  # what a nodule is still counts
    # the HU range the whole CT is read at: its clipped bone is pasted, while the lung ROIs keep every voxel (a
    # changed ceiling kept every item, the pasted CTs clipped at the old one)
    ceiling = load_config("config/config.yaml", {"preprocess": {"max_hu": 500}})
    assert run_settings(ceiling, "x")["hu_read"] == [-1024, 500] != run_settings(cfgs[0], "x")["hu_read"]


def test_unrated_nodules_give_unknown_rois_and_a_train_split_without_nodules_is_refused(tmp_path) -> None:
    from dataclasses import replace

    from lungddpm.preprocessing.roi_training import load_roi_training_data
    from lungddpm.preprocessing.rois import real_nodule_rois

    labelled = labelled_source_ct()  # a 8 mm label-map nodule
    src = replace(labelled, nodules=[])
    rows = extract_rois(labelled, roi_settings(free_per_case=0), tmp_path / "a")
    assert [(r["kind"], r["texture_class"], r["texture"], r["malignancy"]) for r in rows] == [
        ("nodule", "unknown", None, None)
    ]
    ((_row, ct, _, mask),) = real_nodule_rois([tmp_path / "a/rois.csv"])
    assert mask.any() and ct[mask].mean() > -200  # the unrated nodule's own voxels
    cfg = lesion_config(load_config("config/config.yaml", {"lesion": {"roi": {"size": 16}}}))
    assert load_roi_training_data([tmp_path / "a/rois.csv"], cfg).layouts.shape == (1, 4, 16, 16, 16)  # context
    extract_rois(src, roi_settings(), tmp_path / "b")  # free ROIs only
    with pytest.raises(LayoutError, match=r"no nodule among them: the train split has no labelled nodule"):
        load_roi_training_data([tmp_path / "b/rois.csv"], cfg)
    # the validation ROIs feed the preview only: nodule-free (or none) they are taken, not refused as the train's
    assert load_roi_training_data([tmp_path / "b/rois.csv"], cfg, "val").case_ids
    (tmp_path / "c").mkdir()
    (tmp_path / "c/rois.csv").write_text((tmp_path / "b/rois.csv").read_text().splitlines()[0] + "\n")  # no ROI
    assert load_roi_training_data([tmp_path / "c/rois.csv"], cfg, "val") is None
    first = next(iter(sorted((tmp_path / "b").glob("*_layout.nii.gz"))))
    layout, geometry = read_volume(first)
    write_volume(first, np.where(layout == 1, 3, layout).astype(np.uint8), geometry)  # a label no layout holds
    with pytest.raises(LayoutError, match=r"_layout.nii.gz: labels \[(0, )?3\] found, .*; rerun the rois rule for its"):
        load_roi_training_data([tmp_path / "b/rois.csv"], cfg, "val")


def test_the_pasted_labels_nodule_fraction_is_part_of_a_lesion_items_settings(tmp_path) -> None:
    """The pasted CT's native nodule labels follow preprocess.nodule_fraction: an item made with another fraction
    is not complete (before: skipped, keeping its old labels); at the default, 0.5, the key stays out, so items
    made before it (whose provenance lacks it) stay complete."""
    import json

    from lungddpm.synthesis.lesion import run_settings
    from lungddpm.synthesis.volume_run import provenance_complete

    fractions = [load_config("config/config.yaml", {"preprocess": {"nodule_fraction": f}}) for f in (0.5, 0.25)]
    default, quarter = (run_settings(cfg, "x") for cfg in fractions)
    assert "nodule_fraction" not in default and quarter["nodule_fraction"] == 0.25
    files = {"provenance": tmp_path / "item.json", "ct": tmp_path / "item_ct.nii.gz"}
    files["ct"].write_bytes(b"")

    def complete(made_with: dict, now: dict) -> bool:
        files["provenance"].write_text(json.dumps(made_with))
        return provenance_complete(files, now)

    assert complete(default, default) and complete(quarter, quarter)  # the old items' provenance: as `default`
    assert not complete(default, quarter) and not complete(quarter, default)


def test_the_native_label_map_keeps_the_lung_up_to_the_series_edges() -> None:
    """The fine grid (2 mm) stops up to a step short of the series' last slice (7.5 mm of 2.5 mm slices: fine centres
    0..6 mm) and of its last column: lung running to the edge was background on that slice and column before."""
    from lungddpm.preprocessing.grid import SliceGrid, fine_geometry

    grid = SliceGrid(np.array([0.0, 2.5, 5.0, 7.5]), 0.7, 0.7, -10.0, -20.0)
    fine, size = fine_geometry(grid, (4, 8, 8), 2.0)
    assert size == (4, 3, 3)  # 7.5 // 2 + 1; 4.9 // 2 + 1
    labels = native_labels((4, 8, 8), grid, np.ones(size, bool), fine, [])
    assert labels.dtype == np.uint8 and (labels == 1).all()
    half = np.ones(size, bool)
    half[:, :, 2] = False  # the fine grid's last column (4 mm): native columns nearest it and beyond are not lung
    labels = native_labels((4, 8, 8), grid, half, fine, [])
    assert (labels[:, :, :5] == 1).all() and (labels[:, :, 5:] == 0).all()  # 3.5 mm -> fine 2, 2.8 mm -> fine 1


def test_a_native_lung_slab_keeps_its_extent_whatever_its_parity() -> None:
    """1 mm native slices on a 2 mm fine grid: every other native slice is a tie. np.round's ties to even gave the
    same 6 mm of lung 5 native slices or 7 by where it started; ties now go up, as coverage's do."""
    from lungddpm.io import Geometry
    from lungddpm.preprocessing.grid import SliceGrid

    grid = SliceGrid(np.arange(14) * 1.0, 2.0, 2.0, 0.0, 0.0)
    fine = Geometry(spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    extents = []
    for first in (1, 2, 3):
        lung = np.zeros((7, 3, 3), bool)
        lung[first : first + 3] = True  # 3 fine slices: 6 mm of lung
        extents.append(np.flatnonzero(native_labels((14, 3, 3), grid, lung, fine, [])[:, 1, 1] == 1).tolist())
    assert [len(e) for e in extents] == [6, 6, 6] and [e[0] for e in extents] == [1, 3, 5], extents
