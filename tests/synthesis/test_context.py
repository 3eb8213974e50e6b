"""Mask-conditioned inpainting (``lesion.model.context``): the generated regions it trains on, its input channels,
and that inpainting feeds it the site's own ROI and keep mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from support import INSERT, labelled_source_ct, lesion_bank, roi_settings, source_ct, toy_site

from lungddpm.config import lesion_config, load_config
from lungddpm.diffusion.encoding import context_channels, hu_to_model
from lungddpm.diffusion.process import DiffusionConfig, GaussianDiffusion
from lungddpm.diffusion.unet import UNet3D, unet_config_from_dict
from lungddpm.errors import ConfigError
from lungddpm.preprocessing.layout import LUNG, NODULE, ball
from lungddpm.preprocessing.roi_training import generated_region, load_roi_training_data
from lungddpm.preprocessing.rois import extract_rois
from lungddpm.synthesis.lesion import Insertion, inpaint, place

WINDOW = (-1000.0, 400.0)


def test_context_channels_hold_the_known_image_and_the_keep_mask() -> None:
    image = np.array([[[0.5, -0.25, 1.0]]], np.float32)
    keep = np.array([[[True, False, True]]])
    ch = context_channels(image, keep)
    assert ch.dtype == np.float32 and ch.shape == (2, 1, 1, 3)
    assert ch[0, 0, 0].tolist() == [0.5, 0.0, 1.0]  # 0 where generated
    assert ch[1, 0, 0].tolist() == [1.0, -1.0, 1.0]


def test_generated_region_is_the_insertion_margin_around_nodules_and_a_seeded_ball_in_free_rois() -> None:
    layout = np.zeros((16, 16, 16), np.uint8)
    layout[2:14, 2:14, 2:14] = LUNG
    layout[7:9, 7:9, 7:9] = NODULE
    region = generated_region(layout, 1.25, 3.75, (5, 10), seed=0)
    assert np.array_equal(region, ndi.binary_dilation(layout == NODULE, structure=ball(3.0)))  # as insertion()

    free = np.where(layout == NODULE, LUNG, layout).astype(np.uint8)
    a = generated_region(free, 1.25, 0.0, (5, 10), seed=1)
    assert np.array_equal(a, generated_region(free, 1.25, 0.0, (5, 10), seed=1))  # seeded
    assert not np.array_equal(a, generated_region(free, 1.25, 0.0, (5, 10), seed=2))
    assert (free[a] == LUNG).all()  # a ball inside the lung: its radius fits at its centre
    volumes = [generated_region(free, 1.0, 0.0, (5, 10), s).sum() for s in range(8)]
    diameters = [2 * (3 * v / (4 * np.pi)) ** (1 / 3) for v in volumes]
    assert all(4.0 <= d <= 11.0 for d in diameters)  # voxelised balls of 5-10 mm at 1 mm
    with_margin = generated_region(free, 1.25, 2.5, (5, 10), seed=1)  # a ball dilated by 2 voxels: B-open
    core = ndi.binary_erosion(with_margin, ball(2.0))
    assert with_margin.sum() > a.sum() and np.array_equal(ndi.binary_dilation(core, ball(2.0)), with_margin)


def test_a_free_rois_training_region_keeps_off_the_faces_as_insertion_does() -> None:
    """The array border counted as deep lung, so 29 of 50 regions in an all-lung ROI reached a face, where
    insertion never generates (face_border); the model trained on regions it is never asked for."""
    lung = np.full((32, 32, 32), LUNG, np.uint8)
    for seed in range(50):
        region = generated_region(lung, 1.25, 3.75, (5, 15), seed)
        faces = [region[0], region[-1], region[:, 0], region[:, -1], region[:, :, 0], region[:, :, -1]]
        assert region.any() and not any(f.any() for f in faces), seed


def _context_config(**train: object) -> object:
    over = {"lesion": {"roi": {"size": 16}, "model": {"context": True}, "train": {"focus_weight": 2.0, **train}}}
    return lesion_config(load_config("config/config.yaml", over))


def test_context_training_data_appends_known_roi_and_keep_mask_and_weighs_only_the_generated_region(tmp_path) -> None:
    extract_rois(labelled_source_ct(), roi_settings(free_per_case=1), tmp_path)
    data = load_roi_training_data([tmp_path / "rois.csv"], _context_config(context_outside_weight=0.0))
    assert data.layouts.shape == (2, 4, 16, 16, 16) and data.weights is not None
    for i in range(2):
        image, known, keep, w = data.images[i, 0], data.layouts[i, 2], data.layouts[i, 3] > 0, data.weights[i, 0]
        assert keep.any() and (~keep).any()
        assert torch.equal(known[keep], image[keep]) and (known[~keep] == 0).all()
        assert (w[keep] == 0).all() and (w[~keep] >= 1).all()  # context_outside_weight 0; 1 + focus inside
    nodule_roi = int(np.argmax([g != "free" for g in data.groups]))
    nodule = data.layouts[nodule_roi, 1] > -1
    assert (data.layouts[nodule_roi, 3][nodule] == -1).all()  # the nodule is generated, not given
    assert (data.weights[nodule_roi, 0][nodule] == 3.0).all()  # 1 + focus_weight
    free = 1 - nodule_roi
    assert (data.layouts[free, 1] == -1).all()  # a free ROI's region has no nodule in the layout
    assert (data.weights[free, 0][data.layouts[free, 3] < 0] == 1.0).all()
    default = load_roi_training_data([tmp_path / "rois.csv"], _context_config())  # context_outside_weight 1
    assert torch.equal(default.layouts, data.layouts)
    assert (default.weights[data.layouts[:, 3:] > 0] == 1.0).all()
    assert torch.equal(default.weights[data.layouts[:, 3:] < 0], data.weights[data.layouts[:, 3:] < 0])


def test_context_is_the_lesion_models_only() -> None:
    cfg = _context_config()
    model = UNet3D(unet_config_from_dict(cfg.model, image_size=16))
    assert model.cfg.layout_channels == 4 and model.cfg.context
    assert model.input_blocks[0][0].in_channels == 5  # noisy image + lung + nodule + known ROI + keep mask
    with pytest.raises(ConfigError, match=r"model.context: .*lesion scale.*set lesion.model.context instead"):
        load_config("config/config.yaml", {"model": {"context": True}})


class _Recorder(torch.nn.Module):
    """A context UNet that records the conditioning it is given."""

    def __init__(self, net: UNet3D) -> None:
        super().__init__()
        self.net, self.cfg, self.seen = net, net.cfg, []

    def forward(self, x: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        self.seen.append(layout.clone())
        return self.net(x, t, layout)


LEVELS = (0.25, 0.5, 0.75)


def _two_sites_and_a_context_net(texture: str = "bank") -> tuple[list[Insertion], UNet3D]:
    """Two insertion sites of the toy source CT, a bank nodule placed in each, and a seeded 8-channel context UNet."""
    src = source_ct()
    sites = [toy_site(src), toy_site(src, (30.0, 34.0, 28.0))]
    ins = [place("LIDC-IDRI-0001", s, lesion_bank(), 10 + j, INSERT, LEVELS, texture) for j, s in enumerate(sites)]
    torch.manual_seed(0)
    d = {"model_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [], "norm_groups": 4,
         "num_res_blocks": 1, "num_heads": 1, "dropout": 0.0, "use_checkpoint": False, "context": True}  # fmt: skip
    return ins, UNet3D(unet_config_from_dict(d, image_size=16)).eval()


def test_inpainting_feeds_a_context_model_the_sites_own_roi_and_keep_mask() -> None:
    ins, net = _two_sites_and_a_context_net()
    model = _Recorder(net)
    sc = {"batch_size": 2, "precision": "fp32", "sampler": "dpm++", "steps": 3, "clip_x0": True, "guidance": 2.0,
          "jump_length": 0, "jump_n_sample": 1, "timestep_spacing": "trailing"}  # fmt: skip
    after = inpaint(model, GaussianDiffusion(DiffusionConfig(timesteps=50)), ins, WINDOW, sc, torch.device("cpu"))
    assert len(model.seen) == 2 * 3  # guided: a conditional and an unconditional pass per step
    for seen in model.seen:
        assert seen.shape == (2, 4, 16, 16, 16)
        for b, c in enumerate(ins):
            keep = ~c.generated
            known = torch.from_numpy(hu_to_model(c.site.ct, WINDOW))
            assert torch.equal(seen[b, 3] > 0, torch.from_numpy(keep))
            assert torch.equal(seen[b, 2][torch.from_numpy(keep)], known[torch.from_numpy(keep)])
            assert (seen[b, 2][torch.from_numpy(c.generated)] == 0).all()
    for c, a in zip(ins, after):
        assert np.array_equal(a[~c.generated], c.site.ct[~c.generated])  # the kept ROI bit for bit


def test_guidance_against_the_texture_classes_departs_from_their_mean() -> None:
    """guidance_against: classes: the uncond is the mean of the three classes' passes, the requested class's own
    pass reused (three passes per step, not four), and the result is m + w (cond - m) by values; with `any`
    requested all three classes are passed. ('any texture' guidance darkened every class on the demo: `any`, the
    channel's top value, inserts brighter than solid nodules.)"""
    ins, net = _two_sites_and_a_context_net()
    levels = LEVELS
    with torch.no_grad():  # the output layer starts at zero: give the network a response to its layout
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    model = _Recorder(net)
    sc = {"batch_size": 2, "precision": "fp32", "sampler": "dpm++", "steps": 3, "clip_x0": True, "guidance": 2.0,
          "guidance_against": "classes", "jump_length": 0, "jump_n_sample": 1,
          "timestep_spacing": "trailing"}  # fmt: skip
    diffusion, cpu = GaussianDiffusion(DiffusionConfig(timesteps=50)), torch.device("cpu")
    after = inpaint(model, diffusion, ins, WINDOW, sc, cpu, class_levels=levels)
    assert len(model.seen) == 3 * 3  # the conditional pass and the two other classes', per step
    for b, c in enumerate(ins):
        given = [float(seen[b, 1][torch.from_numpy(c.nodule)].max()) for seen in model.seen[:3]]
        assert given == [c.level, *(v for v in levels if v != c.level)]

    class ClassMean(torch.nn.Module):  # the same guidance by hand, at guidance 1
        def __init__(self) -> None:
            super().__init__()
            self.cfg = net.cfg

        def forward(self, x: torch.Tensor, t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
            cond, outs = net(x, t, layout).float(), []
            for k in (1, 2):
                other = layout.clone()
                for b, c in enumerate(ins):
                    rest = [v for v in levels if v != c.level]
                    other[b, 1] = torch.where(layout[b, 1] > -0.95, rest[k - 1], layout[b, 1])
                outs.append(net(x, t, other).float())
            m = (cond + outs[0] + outs[1]) / 3
            return m + 2.0 * (cond - m)

    by_hand = inpaint(ClassMean(), diffusion, ins, WINDOW, {**sc, "guidance": 1.0}, cpu)
    assert all(np.array_equal(a, h) for a, h in zip(after, by_hand))
    plain = inpaint(net, diffusion, ins, WINDOW, {**sc, "guidance": 1.0}, cpu)
    assert not all(np.array_equal(a, p) for a, p in zip(after, plain))  # it guides
    # `any` requested: the mean of all three classes (four passes per step); the levels are required
    anys = _two_sites_and_a_context_net("any")[0]
    model.seen.clear()
    inpaint(model, diffusion, anys, WINDOW, sc, cpu, class_levels=levels)
    assert len(model.seen) == 4 * 3
    assert [float(s[0, 1][torch.from_numpy(anys[0].nodule)].max()) for s in model.seen[:4]] == [1.0, *levels]
    with pytest.raises(ValueError, match=r"guidance against the texture classes needs their 3 levels, got \[\]"):
        inpaint(model, diffusion, anys, WINDOW, sc, cpu)
