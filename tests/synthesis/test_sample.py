from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from support import THREADS, ball_nodule, tiny_config, tiny_data, write_cases

from lungddpm.diffusion.precision import precision_name, resolve_precision
from lungddpm.diffusion.process import GaussianDiffusion
from lungddpm.diffusion.sample import Blend, blend_radii, keep_mask, sample
from lungddpm.diffusion.train import train
from lungddpm.errors import LayoutError, SamplingError
from lungddpm.io import Geometry, files_sha256, read_volume, write_volume
from lungddpm.preprocessing.layout import read_case_pair
from lungddpm.synthesis import volume_run
from lungddpm.synthesis.layout_edit import NoduleBank, save_bank
from lungddpm.synthesis.plan import items_of_run, lesion_plan, plan, shard
from lungddpm.synthesis.volume_run import synthesize_shard


def test_keep_mask_is_eroded_background() -> None:
    layout = np.zeros((10, 10, 10), np.uint8)
    layout[4:6, 4:6, 4:6] = 1
    keep = keep_mask(layout, (1, 1, 1))
    assert not keep[layout > 0].any()
    assert not keep[3, 4, 4] and keep[2, 4, 4]  # one-voxel margin around the lung is generated
    assert keep[0, 0, 0]  # the volume border does not erode
    assert np.array_equal(keep_mask(layout, (0, 0, 0)), layout == 0)


@pytest.mark.parametrize(("spacing", "margin"), [((1.25, 0.7, 0.7), 10.0), ((3.0, 1.0, 1.0), 3.2), ((1, 1, 1), 1.45),
                                                 ((0.1, 0.1, 0.1), 0.3)])  # fmt: skip
def test_the_blend_margin_is_a_ball_in_mm_on_any_grid(spacing: tuple[float, ...], margin: float) -> None:
    """The kept background starts exactly beyond sample.blend_margin_mm of the lung. The margin was rounded per
    axis before: 300 kept voxels within 10 mm of a lung voxel at 1.25 x 0.7 x 0.7 mm (radii 8, 14, 14)."""
    from scipy import ndimage

    layout = np.zeros((25, 41, 41), np.uint8)
    layout[12, 20, 20] = 1
    keep = keep_mask(layout, blend_radii(margin, spacing))
    distance = ndimage.distance_transform_edt(layout == 0, sampling=spacing)
    assert np.array_equal(keep, distance > margin * (1 + 1e-9))


def test_a_fractional_blend_margin_reruns_sampling_only_where_it_changed() -> None:
    """The shipped grids divide their margins (nothing reruns); elsewhere the params and provenance carry it."""
    from lungddpm.settings import fractional_blend

    base = {"sample": {"blend": True, "blend_margin_mm": 10.0}, "preprocess": {"spacing_mm": [10.0, 10.0, 10.0]}}
    assert fractional_blend(base) == {} and fractional_blend({**base, "preprocess": {"spacing_mm": [2.5] * 3}}) == {}
    odd = {**base, "preprocess": {"spacing_mm": [1.25, 0.7, 0.7]}}
    assert fractional_blend(odd) == {"margin_vox": [8.0, 14.285714, 14.285714]}
    assert fractional_blend({**odd, "sample": {"blend": False, "blend_margin_mm": 10.0}}) == {}


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddim", 20), ("dpm++", 20)])
def test_blending_keeps_reference_at_the_same_noise_level(sampler: str, steps: int) -> None:
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(3)
    shape = (1, 1, 16, 16, 16)
    ref, x0 = torch.rand(shape, generator=g) * 2 - 1, torch.rand(shape, generator=g) * 2 - 1
    keep = torch.zeros(shape, dtype=torch.bool)
    keep[..., :8] = True
    seen: list[tuple[int, float]] = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        """Voxel-wise exact ε for x0; records the noise level of the kept region as the sampler sees it."""
        a = d.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        z = (x_t - a.sqrt() * ref) / (1 - a).sqrt()
        seen.append((int(t[0]), float(z[keep].std())))
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    out = sample(
        oracle,
        d,
        torch.zeros(1, 2, 16, 16, 16),
        sampler,
        steps,
        torch.Generator().manual_seed(0),
        blend=Blend(ref, keep),
    )
    assert torch.equal(out[keep], ref[keep])  # clean reference after the last step
    assert (out[~keep] - x0[~keep]).abs().max() < 1e-3  # blending never touched the generated region
    # from the second call on, the kept region holds the reference noised to exactly the level being denoised
    stds = [s for _, s in seen[1:]]
    assert min(stds) > 0.9 and max(stds) < 1.1, seen[:3]


def test_same_seed_same_volume_different_seed_different() -> None:
    d = GaussianDiffusion()
    model = lambda x, t, layout: 0.1 * x  # noqa: E731 - any deterministic denoiser
    layout = torch.zeros(1, 2, 8, 8, 8)
    a = sample(model, d, layout, "ddpm", 30, torch.Generator().manual_seed(1))
    b = sample(model, d, layout, "ddpm", 30, torch.Generator().manual_seed(1))
    c = sample(model, d, layout, "ddpm", 30, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path], Path]:
    root = tmp_path_factory.mktemp("synth")
    cfg = tiny_config(steps=3, checkpoint_every=3)
    train(tiny_data(), cfg, root / "model", root / "state", threads=THREADS)
    cts, layouts = write_cases(root / "data", 2)
    bank = NoduleBank((ball_nodule(0, 12.0), ball_nodule(1, 15.0)))
    save_bank(bank, root / "bank.npz")
    return root / "model" / "checkpoint.pt", cts, layouts, root / "bank.npz"


def synth_config(**sample_cfg: object):
    cfg = tiny_config()
    raw = dict(cfg.raw)
    raw["sample"] = {**raw["sample"], "sampler": "ddim", "steps": 3, "blend_margin_mm": 10, **sample_cfg}
    raw["layout_edit"] = {**raw["layout_edit"], "insert": 1, "diameter_mm": [5, 30]}
    return type(cfg).from_dict(raw)


def test_synthesized_files_hu_affine_provenance_and_skip(tiny_model, tmp_path: Path, monkeypatch) -> None:
    from lungddpm.diffusion import checkpoint as checkpoints

    checkpoint, cts, layouts, bank = tiny_model
    cfg = synth_config(samples_per_layout=2)
    cases = {p.parent.name: p for p in cts}
    lays = {p.name.removesuffix(".nii.gz"): p for p in layouts}
    items = plan("augment", sorted(cases), 2, 0)
    assert [it.name for it in shard(items, 2, 0)] == ["case0_0", "case1_0"]
    for n, index in ((2, 2), (2, -1), (0, 0)):  # an empty manifest would stand for a share never sampled
        with pytest.raises(ValueError, match=rf"shard {index} of {n}: a shard index runs from 0 to n_shards - 1"):
            shard(items, n, index)
    manifest = synthesize_shard("augment", items, cfg, checkpoint, cases, lays, tmp_path, bank, threads=THREADS)
    assert [m["skipped"] for m in manifest] == [False] * 4
    for item in items:
        ct, _ = read_volume(cases[item.case_id])
        img = nib.load(tmp_path / f"{item.name}.nii.gz")
        assert img.get_data_dtype() == np.int16
        assert np.allclose(img.affine, nib.load(cases[item.case_id]).affine)
        syn, _ = read_volume(tmp_path / f"{item.name}.nii.gz")
        layout, _ = read_volume(tmp_path / f"{item.name}_layout.nii.gz")
        prov = json.loads((tmp_path / f"{item.name}.json").read_text())
        keep = keep_mask(layout, (1, 1, 1))
        assert prov["keep_voxels"] == int(keep.sum()) > 0
        assert np.array_equal(syn[keep], ct[keep])  # the reference's exact HU where it was kept
        assert prov["edits"][0]["op"] == "insert" and prov["sampler"] == "ddim" and prov["steps"] == 3
        assert prov["model_sha256"] == checkpoints.model_sha256(checkpoint) and prov["seed"] == item.seed
        assert prov["precision"] == cfg.raw["sample"]["precision"] and prov["precision_used"] == precision_name(
            resolve_precision(prov["precision"], torch.device("cpu"))
        )  # auto: what it became here
        assert (layout == 2).sum() > (read_volume(lays[item.case_id])[0] == 2).sum()
        assert (tmp_path / f"{item.name}.gif").read_bytes()[:3] == b"GIF"
        assert (tmp_path / f"{item.name}_montage.png").read_bytes()[:4] == b"\x89PNG"
    k0, _ = read_volume(tmp_path / "case0_0.nii.gz")
    k1, _ = read_volume(tmp_path / "case0_1.nii.gz")
    assert not np.array_equal(k0, k1)  # different seeds per k
    loads = []
    load = checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path: loads.append(path) or load(path))
    again = synthesize_shard("augment", items, cfg, checkpoint, cases, lays, tmp_path, bank, threads=THREADS)
    assert [m["skipped"] for m in again] == [True] * 4 and loads == [checkpoint]  # read once, digest included
    (tmp_path / "case1_1.gif").unlink()  # an incomplete item is redone, the rest skipped
    cfg_eval = synth_config(samples_per_layout=2)
    redo = synthesize_shard("augment", items, cfg_eval, checkpoint, cases, lays, tmp_path, bank, threads=THREADS)
    assert [m["skipped"] for m in redo] == [True, True, True, False]
    (tmp_path / "case0_0.gif").unlink()  # the first item redone, the rest skipped: the manifest stays in item order
    resumed = synthesize_shard("augment", items, cfg_eval, checkpoint, cases, lays, tmp_path, bank, threads=THREADS)
    assert [(m["item"], m["k"], m["skipped"]) for m in resumed] == [
        ("case0_0", 0, False), ("case0_1", 1, True), ("case1_0", 0, True), ("case1_1", 1, True)
    ]  # fmt: skip
    other = synth_config(samples_per_layout=2, steps=4)  # changed settings: everything is redone
    assert not any(
        m["skipped"]
        for m in synthesize_shard("augment", items[:1], other, checkpoint, cases, lays, tmp_path, bank, threads=THREADS)
    )


def test_a_new_seed_new_inputs_or_a_new_bank_are_sampled_anew(tiny_model, tmp_path: Path) -> None:
    """Whatever makes an item's volume is in its provenance: a rerun after such an edit never keeps the old one."""
    checkpoint, cts, layouts, bank = tiny_model
    cfg = synth_config(samples_per_layout=1)
    cases = {p.parent.name: p for p in cts}
    lays = {p.name.removesuffix(".nii.gz"): shutil.copy(p, tmp_path / p.name) for p in layouts}
    out = tmp_path / "out"

    def skipped(items: list, bank_path: Path = bank, config=cfg) -> list[bool]:
        return [m["skipped"] for m in synthesize_shard("augment", items, config, checkpoint, cases, lays, out,
                                                       bank_path, threads=THREADS)]  # fmt: skip

    items = plan("augment", sorted(cases), 1, 0)
    assert skipped(items) == [False, False] and skipped(items) == [True, True]
    prov = json.loads((out / "case0_0.json").read_text())
    assert prov["inputs_sha256"] == files_sha256([cases["case0"], lays["case0"]]) and prov["precision"] == "auto"
    assert skipped(plan("augment", sorted(cases), 1, 1)) == [False, False]  # sample.seed: other seeds
    assert skipped(items) == [False, False]  # and back
    layout, geometry = read_volume(lays["case1"])
    layout[0, 0, 0] = 1 - min(int(layout[0, 0, 0]), 1)  # the case's layout edited: that case only is sampled anew
    write_volume(lays["case1"], layout, geometry)
    assert skipped(items) == [True, False]
    other_bank = tmp_path / "bank.npz"
    save_bank(NoduleBank((ball_nodule(0, 14.0),)), other_bank)
    assert skipped(items, other_bank) == [False, False]  # another nodule bank
    third = synth_config(samples_per_layout=1)
    third = type(third).from_dict({**third.raw, "preprocess": {**third.raw["preprocess"], "nodule_fraction": 0.3}})
    assert skipped(items, other_bank, third) == [False, False]  # inserted nodules labelled at another fraction
    fp32 = synth_config(samples_per_layout=1, precision="fp32")
    assert skipped(items, other_bank, fp32) == [False, False]
    made = json.loads((out / "case0_0.json").read_text())
    (out / "case0_0.json").write_text(json.dumps({**made, "precision_used": "bf16"}))  # auto, on a bf16 machine
    assert skipped(items, other_bank, fp32) == [False, True]  # a resume in another precision remakes, never mixes


def test_an_augment_run_inserting_nothing_ignores_the_banks_filters(tiny_model, tmp_path: Path) -> None:
    """With layout_edit.insert 0 the bank's filters and the placement tries shape nothing: editing them remakes no
    item (it resampled the whole run), nor does an item whose provenance holds the whole section (made before);
    remove_existing does shape the layouts."""
    checkpoint, cts, layouts, _bank = tiny_model
    cases = {p.parent.name: p for p in cts}
    lays = {p.name.removesuffix(".nii.gz"): p for p in layouts}
    out = tmp_path / "out"

    def skipped(**edit: object) -> list[bool]:
        cfg = synth_config(samples_per_layout=1)
        raw = {**cfg.raw, "layout_edit": {**cfg.raw["layout_edit"], "insert": 0, **edit}}
        return [m["skipped"] for m in synthesize_shard("augment", items, type(cfg).from_dict(raw), checkpoint, cases,
                                                       lays, out, None, threads=THREADS)]  # fmt: skip

    items = plan("augment", sorted(cases), 1, 0)[:1]
    assert skipped() == [False] and skipped(diameter_mm=[3, 5], max_attempts=7, min_readers=3) == [True]
    prov_path = out / f"{items[0].name}.json"
    prov = json.loads(prov_path.read_text())
    assert prov["layout_edit"] == {"insert": 0, "remove_existing": False}
    prov_path.write_text(json.dumps({**prov, "layout_edit": {**synth_config().raw["layout_edit"], "insert": 0}}))
    assert skipped() == [True]  # the whole section, as items made before recorded it
    assert skipped(remove_existing=True) == [False]


def test_a_checkpoint_that_samples_nan_is_named_with_its_items_and_writes_nothing(tiny_model, tmp_path: Path) -> None:
    """Weights that are not finite (an imported checkpoint, say) sample NaN: refused with the checkpoint, the items
    and the fp32 key, no volume written (NaN became 0 HU, soft tissue, in the synthetic CT)."""
    checkpoint, cts, layouts, _bank = tiny_model
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key in ("model", "ema"):
        ckpt[key] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ckpt[key].items()}
    broken = tmp_path / "broken.pt"
    torch.save(ckpt, broken)
    cases = {p.parent.name: p for p in cts}
    lays = {p.name.removesuffix(".nii.gz"): p for p in layouts}
    items = plan("eval", sorted(cases), 1, 0)
    with pytest.raises(SamplingError, match=rf"{broken}: items case0_0: volume\(s\) \[0\] of the batch of 1 came out "
                       r"not finite .* \(sample.precision: fp32\)"):  # fmt: skip
        synthesize_shard("eval", items, synth_config(samples_per_layout=1), broken, cases, lays, tmp_path / "out",
                         threads=THREADS)  # fmt: skip
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_a_rerun_never_accepts_an_item_that_other_settings_made_or_half_rewrote(
    tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back to the default timestep spacing after a quadratic run: sampled anew (the default is left out of the
    settings, so the provenance's "quadratic" must count). A rerun with other settings killed after the image was
    rewritten: the item is incomplete, so going back to the first settings samples it anew too."""
    checkpoint, cts, layouts, _ = tiny_model
    cases = {p.parent.name: p for p in cts}
    lays = {p.name.removesuffix(".nii.gz"): p for p in layouts}
    items = plan("eval", sorted(cases), 1, 0)[:1]

    def skipped(config) -> list[bool]:
        return [m["skipped"] for m in synthesize_shard("eval", items, config, checkpoint, cases, lays, tmp_path, None,
                                                       threads=THREADS)]  # fmt: skip

    trailing, quadratic = (
        synth_config(samples_per_layout=1),
        synth_config(samples_per_layout=1, timestep_spacing="quadratic"),
    )
    assert skipped(trailing) == [False] and skipped(trailing) == [True]
    assert skipped(quadratic) == [False] and skipped(quadratic) == [True]
    assert skipped(trailing) == [False]
    image = tmp_path / f"{items[0].name}.nii.gz"
    first = image.read_bytes()
    real_write = volume_run.write_volume

    def killed_after_the_image(path: Path, *args, **kwargs) -> None:
        real_write(path, *args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(volume_run, "write_volume", killed_after_the_image)
    with pytest.raises(KeyboardInterrupt):
        skipped(synth_config(samples_per_layout=1, steps=4))
    monkeypatch.undo()
    assert image.read_bytes() != first and not (tmp_path / f"{items[0].name}.json").exists()
    assert skipped(trailing) == [False] and image.read_bytes() == first


def test_an_impossible_augment_names_the_bank_or_the_layout_and_the_keys(tiny_model, tmp_path: Path) -> None:
    checkpoint, cts, layouts, bank = tiny_model
    cases = {p.parent.name: p for p in cts}
    lays = {p.name.removesuffix(".nii.gz"): p for p in layouts}
    items = plan("augment", sorted(cases), 1, 0)[:1]

    def augment(**layout_edit: object) -> None:
        raw = dict(synth_config(samples_per_layout=1).raw)
        raw["layout_edit"] = {**raw["layout_edit"], **layout_edit}
        cfg = type(synth_config()).from_dict(raw)
        synthesize_shard("augment", items, cfg, checkpoint, cases, lays, tmp_path, bank, threads=THREADS)

    with pytest.raises(LayoutError, match=rf"{bank.name}: none of its \d+ nodules matches layout_edit \(diameter_mm "
                                          r"\[90, 95\].*min_readers 1\); widen"):  # fmt: skip
        augment(diameter_mm=[90, 95])
    with pytest.raises(LayoutError, match=rf"{lays['case0'].name} \(item case0_0\): could not place nodule \d+ of "
                                          "4000 .*; lower layout_edit.insert"):  # fmt: skip
        augment(insert=4000, max_attempts=1)


def test_bad_layouts_are_refused(tmp_path: Path) -> None:
    geom = Geometry((10.0, 10.0, 10.0), (0.0, 0.0, 0.0))
    write_volume(tmp_path / "ct.nii.gz", np.zeros((8, 8, 8), np.int16), geom)
    write_volume(tmp_path / "bad_labels.nii.gz", np.full((8, 8, 8), 3, np.uint8), geom)
    write_volume(tmp_path / "bad_shape.nii.gz", np.zeros((8, 8, 4), np.uint8), geom)
    with pytest.raises(LayoutError, match=r"bad_labels.nii.gz: labels \[3\] found.*; rerun the stage that wrote it "
                       r"\(layout for a real case, rois for a real ROI; sample or synthesize_lesion for a synthetic "
                       r"item\)"):  # fmt: skip
        read_case_pair(tmp_path / "ct.nii.gz", tmp_path / "bad_labels.nii.gz")
    with pytest.raises(LayoutError, match=r"bad_shape.nii.gz: grid \(8, 8, 4\) at .* differs from its CT"):
        read_case_pair(tmp_path / "ct.nii.gz", tmp_path / "bad_shape.nii.gz")
    write_volume(tmp_path / "moved.nii.gz", np.zeros((8, 8, 8), np.uint8), Geometry((10.0,) * 3, (5.0, 0.0, 0.0)))
    with pytest.raises(LayoutError, match=r"origin \(5.0, 0.0, 0.0\).* differs from its CT .*origin \(0.0, 0.0, 0.0\)"
                       r".*synthesize_lesion for a synthetic item"):  # fmt: skip
        read_case_pair(tmp_path / "ct.nii.gz", tmp_path / "moved.nii.gz")


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++"])
def test_a_batch_equals_its_volumes_sampled_alone(sampler: str) -> None:
    d = GaussianDiffusion()
    torch.manual_seed(0)
    weight = torch.randn(1, 3, 3, 3, 3) * 0.1

    def model(x: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:  # a conv "network"
        return torch.nn.functional.conv3d(torch.cat([x, layout], 1), weight, padding=1)

    layouts = torch.randn(2, 2, 8, 8, 8)
    refs = torch.rand(2, 1, 8, 8, 8)
    keep = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    keep[..., :3] = True
    steps = 30 if sampler == "ddpm" else 10
    batch = sample(
        model, d, layouts, sampler, steps, [torch.Generator().manual_seed(s) for s in (5, 6)], blend=Blend(refs, keep)
    )
    for b, s in enumerate((5, 6)):
        alone = sample(
            model,
            d,
            layouts[b : b + 1],
            sampler,
            steps,
            torch.Generator().manual_seed(s),
            blend=Blend(refs[b : b + 1], keep[b : b + 1]),
        )
        assert torch.allclose(batch[b : b + 1], alone, atol=1e-5)
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        sample(model, d, layouts, sampler, 2, [torch.Generator()])


def test_a_model_of_another_grid_is_refused_or_named(tiny_model, tmp_path: Path, caplog) -> None:
    """``sample.checkpoint`` of a model trained at other voxels: another spacing is refused, naming the layout and
    both spacings (it drew anatomy at the wrong scale, silently, before); another grid size is sampled with a
    warning; an imported Lung-DDPM model (its own convention and grid) is not checked."""
    from lungddpm.diffusion.checkpoint import CheckpointError, check_sampling_grid, load_checkpoint

    checkpoint, cts, layouts, _bank = tiny_model
    ct, layout, geometry = read_case_pair(cts[0], layouts[0])
    coarse = Geometry((12.5, 10.0, 10.0), geometry.origin)
    for path, volume in ((tmp_path / "case0" / "ct.nii.gz", ct), (tmp_path / "case0.nii.gz", layout)):
        path.parent.mkdir(exist_ok=True)
        write_volume(path, volume, coarse)
    items = plan("eval", ["case0"], 1, 0)
    cfg = synth_config(samples_per_layout=1)
    said = (
        r"case0.nii.gz: voxels of \[12.5, 10.0, 10.0\] mm, but .*checkpoint.pt was trained on \[10.0, 10.0, 10.0\] mm "
        r"\(preprocess.spacing_mm\): it would draw anatomy"
    )
    with pytest.raises(CheckpointError, match=said):
        synthesize_shard("eval", items, cfg, checkpoint, {"case0": tmp_path / "case0/ct.nii.gz"},
                         {"case0": tmp_path / "case0.nii.gz"}, tmp_path / "out", None, threads=THREADS)  # fmt: skip
    assert not list((tmp_path / "out").glob("*.nii.gz"))
    ckpt = load_checkpoint(checkpoint)
    caplog.set_level("WARNING")
    check_sampling_grid(ckpt, (16, 24, 24), geometry.spacing, checkpoint, layouts[0])
    assert f"{layouts[0]}: a [16, 24, 24] grid, but {checkpoint} was trained on {list(ckpt['size'])}" in caplog.text
    caplog.clear()
    check_sampling_grid(ckpt, tuple(ckpt["size"]), geometry.spacing, checkpoint, layouts[0])
    check_sampling_grid({**ckpt, "convention": {}}, (16, 24, 24), (1.0, 1.0, 1.0), checkpoint, layouts[0])
    assert not caplog.text


def test_more_shards_than_items_are_named_and_an_empty_shard_loads_no_model(tmp_path: Path, caplog) -> None:
    """sample.shards above a run's items: said at parse time with the bound, and a shard without items writes its
    empty manifest without reading the model (the checkpoint here does not exist)."""
    from lungddpm.synthesis.lesion_run import synthesize_lesion_shard
    from lungddpm.synthesis.plan import empty_shards_warning

    items = plan("eval", ["c0", "c1", "c2"], 1, 0)
    assert [len(shard(items, 5, i)) for i in range(5)] == [1, 1, 1, 0, 0]
    raw = {"sample": {"samples_per_layout": 3, "eval_samples_per_layout": 1, "seed": 0},
           "lesion": {"insert": {"samples_per_case": 2}, "sample": {"seed": 5}}}  # fmt: skip
    assert items_of_run(raw, "eval", ["c2", "c0", "c1"]) == items  # the eval run's own samples per layout
    assert items_of_run(raw, "augment", ["c0"]) == plan("augment", ["c0"], 3, 0)
    assert items_of_run(raw, "lesion", ["c1", "c0"]) == lesion_plan(["c0", "c1"], 2, 5)
    said = empty_shards_warning("eval", len(items), 5, "sample.shards")
    assert said is not None and "5 shards for the 3 items of the eval run: shards 3 to 4" in said
    assert said.endswith("set sample.shards <= 3") and empty_shards_warning("eval", 3, 3, "sample.shards") is None
    cfg = tiny_config()
    missing = tmp_path / "no_model.pt"
    assert synthesize_shard("eval", [], cfg, missing, {}, {}, tmp_path / "out") == []
    assert synthesize_lesion_shard([], cfg, missing, {}, {}, tmp_path / "bank.npz", tmp_path / "lesion") == []
    assert "this shard has no items: sample.shards" in caplog.text and "lesion.sample.shards" in caplog.text
    assert not (tmp_path / "out").exists()


def test_an_items_blend_settings_count_only_where_it_blends() -> None:
    """blend off: the margin and start fraction shape no volume, so an item's provenance (and the rule's params) hold
    them; before, editing one remade every item. With blending on they count."""
    import copy

    from lungddpm.config import Config, validate_config

    def settings(**sample: object) -> dict:
        raw = copy.deepcopy(tiny_config().raw)
        raw["sample"].update(sample)
        return volume_run._settings(Config.from_dict(validate_config(raw)), "eval", "x", None)

    assert settings(blend=False) == settings(blend=False, blend_margin_mm=20, blend_start_fraction=0.5)
    assert settings(blend=True) != settings(blend=True, blend_margin_mm=20)
