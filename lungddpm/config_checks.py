"""Cross-field checks of a validated config that the JSON schema cannot express: settings that would crash deep
inside a rule, or silently do something else than asked, refused at parse time with the key and the fix.

Each check returns messages ``"<key>: <what is wrong>; <the fix>"``. The lesion scale's network, training and grid
are checked again through :func:`lungddpm.config.lesion_config`'s merged view (``preprocess.size`` = the ROI grid).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# the nodule channel's texture levels (lesion.texture_hu in model units) lie strictly inside these
# (diffusion.encoding.texture_levels): apart from -1 outside the nodules and from 1, "any texture"
TEXTURE_LEVEL_BOUNDS = (-0.9, 0.95)
LINEAR_MIN_TIMESTEPS = 21  # below, the linear schedule's beta_end (DDPM's 0.02 at T=1000, x 1000 / T) reaches 1


def consistency_problems(config: Mapping[str, Any], scale: str = "volume") -> list[str]:
    """Every cross-field problem of ``config`` (defaults filled): grids, crops, attention and heads of the network,
    lesion insertion, ROI jitter and the fidelity profile, the linear schedule's length, the HU window and what
    lies in it, sampler steps against the schedule, the layout's lung-volume bounds, the feature network's
    settings and a case list the source does not read. ``scale``: ``lesion`` for
    :func:`lungddpm.config.lesion_config`'s merged view (its ``sample`` section is the whole-volume model's)."""
    if first := _section_problems(config, scale):  # the rest builds on these
        return first
    lesion = config.get("lesion") or {}
    config = {**config, "lesion": lesion if lesion_scale_runs(config) else {}}  # a scale that never runs: not checked
    return (
        _grid_problems(config)
        + _network_problems(config)
        + _lesion_problems(config["lesion"])
        + _diameter_problems(config.get("layout_edit") or {}, "layout_edit")
        + _schedule_problems(config.get("diffusion") or {})
        + _range_problems(config, scale)
        + _input_problems(config)
    )


def _section_problems(config: Mapping[str, Any], scale: str) -> list[str]:
    """What a section needs of itself beyond its schema: the data source's folders, a patient regex with a group,
    a split that sums to 1, a GPU per DDP process, inpainting context at the lesion scale only."""
    out: list[str] = []
    data = config.get("data") if isinstance(config.get("data"), dict) else {}  # else the schema's problem
    if data.get("source") == "lidc" and not data.get("dicom_root"):
        out.append(
            "data.dicom_root: required when data.source is 'lidc'; pass snakemake --config 'data={source: lidc, "
            "dicom_root: /path/to/LIDC-IDRI}' (lungddpm: --set data.dicom_root=/path/to/LIDC-IDRI)"
        )
    if data.get("source") == "images" and not data["images"]["ct_dir"]:
        out.append("data.images.ct_dir: required when data.source is 'images'; set it to your CT volumes' folder")
    images = data.get("images")
    regex = images.get("patient_regex") if isinstance(images, dict) else None  # else the schema's problem
    if regex:
        try:
            if re.compile(regex).groups < 1:
                out.append(f"data.images.patient_regex: {regex!r} has no group; put the patient part in (...)")
        except re.error as exc:
            out.append(f"data.images.patient_regex: {regex!r} is not a regex ({exc})")
    split = config.get("split", {})
    if abs(sum(split[k] for k in ("train", "val", "test")) - 1.0) > 1e-6:
        out.append("split: train + val + test must sum to 1")
    train = config.get("train", {})
    if 0 < train["gpus"] < train["processes"]:
        out.append(
            f"train.processes: {train['processes']} processes for {train['gpus']} GPU(s); DDP runs one process per "
            "GPU: set train.gpus >= train.processes (or train.gpus: 0 to request none: the ranks then run on the "
            "CPU unless the host shows a GPU for each)"
        )
    if scale == "volume" and config["model"].get("context"):
        out.append(
            "model.context: mask-conditioned inpainting is the lesion scale's (its training knows the generated "
            "regions); set lesion.model.context instead"
        )
    return out


def given_checkpoint(config: Mapping[str, Any], results: str | os.PathLike[str] = "results") -> bool:
    """Whether ``sample.checkpoint`` names a model of its own: set, and not the path of the model trained here,
    ``<results>/models/<train.name>/checkpoint.pt`` (by any path to it; symlinks are not followed)."""
    given = (config.get("sample") or {}).get("checkpoint")
    trained = os.path.join(results, "models", str((config.get("train") or {}).get("name")), "checkpoint.pt")
    return bool(given) and os.path.abspath(given) != os.path.abspath(trained)


def trained_checkpoint_unset(config: dict[str, Any], results: str | os.PathLike[str] = "results") -> dict[str, Any]:
    """``config`` with ``sample.checkpoint`` null where it names the model trained here (its default), so that the
    rules' params read the same whether that path is written out or not (written out, it reran every sampling job)."""
    sample = config.get("sample") or {}
    if sample.get("checkpoint") is None or given_checkpoint(config, results):
        return config
    return {**config, "sample": {**sample, "checkpoint": None}}


def lesion_scale_runs(config: Mapping[str, Any]) -> bool:
    """Whether a stage reads the lesion scale: ``lesion.enabled``, or an enabled segmentation at scale ``lesion`` or
    with an arm of ``synthetic_source: lesion`` (which runs the ROIs and the lesion run even when it is off)."""
    lesion, seg = config.get("lesion") or {}, config.get("segmentation") or {}
    if lesion.get("enabled", True) or not seg.get("enabled", True):
        return bool(lesion.get("enabled", True))
    arms = seg.get("arms") or []
    return seg.get("scale") == "lesion" or any((a or {}).get("synthetic_source") == "lesion" for a in arms)


def _input_problems(config: Mapping[str, Any]) -> list[str]:
    """Inputs a run would ignore or miss: a case list or data folder the source does not read, a reversed
    feature-network HU range (every volume would give the same features), the medicalnet extractor without its
    weight file."""
    out = []
    data = config.get("data") or {}
    if data.get("cases") and data.get("source") != "lidc":
        out.append(
            f"data.cases: a list of LIDC patients, which data.source {data['source']!r} does not read (demo: "
            "data.demo.n_scans picks the cases; images: each volume of data.images.ct_dir); remove it"
        )
    source = data.get("source", "demo")
    given = {"dicom_root": ("lidc", data.get("dicom_root"))}
    given |= {f"images.{k}": ("images", (data.get("images") or {}).get(k)) for k in ("ct_dir", "label_dir")}
    for key, (reads, value) in given.items():
        if value is not None and source != reads:  # the demo would run in place of the data given
            out.append(f"data.{key}: {value!r} is read with data.source {reads} only, and data.source is {source!r} "
                       f"(the {'phantom demo' if source == 'demo' else source + ' data'} would run instead); add "
                       f"source: {reads} (--config 'data={{source: {reads}, ...}}'), or remove data.{key}")  # fmt: skip
    features = (config.get("metrics") or {}).get("features") or {}
    if features and float(features["clip_hu"][0]) >= float(features["clip_hu"][1]):
        out.append(f"metrics.features.clip_hu: {features['clip_hu']} is reversed or empty (every volume would give "
                   "the same features); give [lowest HU, highest HU], e.g. [-1000, 200]")  # fmt: skip
    if features.get("weights") and features.get("extractor", "astra") != "medicalnet":  # astra would run, silently
        out.append(f"metrics.features.weights: {features['weights']!r} is read by the medicalnet extractor only, and "
                   f"metrics.features.extractor is {features.get('extractor', 'astra')!r}; set extractor: medicalnet, "
                   "or remove weights")  # fmt: skip
    if features.get("extractor") == "medicalnet" and not features.get("weights"):
        out.append("metrics.features.weights: the medicalnet extractor needs its weight file; give the path of a "
                   "local MedicalNet resnet_50 .pth file (Tencent/MedicalNet), or use extractor: astra")  # fmt: skip
    return out


def _hu_floor_problems(config: Mapping[str, Any]) -> list[str]:
    """The readers raise everything below ``preprocess.padding_hu`` to it: the lung mask's thresholds must lie above
    it, or no voxel is ever below them (no airway removed, or no lung found; with label maps of the lungs the body
    mask's midline still uses ``threshold_hu``, and maps without a lung label are segmented)."""
    from .preprocessing.lungmask import LUNG_LIKE_HU  # (lungmask imports the config)

    pad, lm = float(config["preprocess"]["padding_hu"]), config.get("lungmask") or {}  # label maps too: the body
    out = []
    if pad >= LUNG_LIKE_HU:
        out = [f"preprocess.padding_hu: {pad:g} HU is not below {LUNG_LIKE_HU:g} HU, the darkest lung (emphysema): "
                "room air and padding raised to it would read as lung, and the lung mask would take them for a lung "
                "the image's edge cut or miss room air enclosed by the arms; lower it (the default -1024)"]  # fmt: skip
    return out + [f"lungmask.{k}: {lm[k]:g} HU is not above preprocess.padding_hu {pad:g} HU, the floor every CT is "
            f"raised to, so no voxel is below it ({what}); raise lungmask.{k} or lower preprocess.padding_hu"
            for k, what in (("threshold_hu", "no lung would be found"),
                            ("airway_threshold_hu", "the trachea and main bronchi would stay in the lungs"))
            if k in lm and float(lm[k]) <= pad]  # fmt: skip


def _range_problems(config: Mapping[str, Any], scale: str) -> list[str]:
    """Bounds that would fail only hours in (sampler steps after training) or never (a reversed HU window trains
    on constant images): the HU window, the texture HU inside it, the sampler steps within the schedule's
    timesteps (an imported network, ``model.init_from``, brings its own), RePaint with DPM-Solver++, the layout's
    lung-volume bounds."""
    out = []
    lo, hi = (float(v) for v in config["intensity"]["hu_window"])
    if lo >= hi:
        return [f"intensity.hu_window: [{lo:g}, {hi:g}] is reversed or empty; give [lowest HU, highest HU], e.g. "
                "[-1000, 400]"]  # fmt: skip
    lesion = config.get("lesion") or {}
    texture = [float(v) for v in lesion.get("texture_hu") or []]
    low, high = (lo + (hi - lo) * (level + 1) / 2 for level in TEXTURE_LEVEL_BOUNDS)
    # the levels as diffusion.encoding computes them, in float32 (a bound met in float64 can be missed there)
    levels = (np.clip(np.asarray(texture, np.float32), lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    if texture and not all(TEXTURE_LEVEL_BOUNDS[0] < float(v) < TEXTURE_LEVEL_BOUNDS[1] for v in levels):
        out.append(f"lesion.texture_hu: {texture} must lie inside intensity.hu_window [{lo:g}, {hi:g}], clear of its "
                   f"ends: between {low:g} and {high:g} HU (each texture's level in the nodule channel stays apart "
                   "from -1 outside the nodules and 1 for any texture); move it in or widen the window")  # fmt: skip
    if len(set(levels.tolist())) < len(levels):  # two classes one level: merged, or guidance's list one short
        out.append(f"lesion.texture_hu: {texture} gives two texture classes one level (in float32); give each class "
                   "its own HU")  # fmt: skip
    steps = [("train.preview_sampler_steps", config["train"].get("preview_sampler_steps"))]
    if scale == "volume" and not given_checkpoint(config):  # a given model: its own schedule
        steps.append(("sample.steps", (config.get("sample") or {}).get("steps")))
    timesteps = int((config.get("diffusion") or {}).get("timesteps", 1000))
    if not config["model"].get("init_from"):
        for key, value in steps:
            if value is not None and int(value) > timesteps:
                out.append(f"{key}: {value} steps exceed diffusion.timesteps {timesteps}; use at most {timesteps}")
    if lesion:
        lesion_t = int({**(config.get("diffusion") or {}), **(lesion.get("diffusion") or {})}.get("timesteps", 1000))
        ls = lesion["sample"]
        if int(ls["steps"]) > lesion_t:
            out.append(f"lesion.sample.steps: {ls['steps']} steps exceed the lesion model's diffusion.timesteps "
                       f"{lesion_t}; use at most {lesion_t}")  # fmt: skip
        if ls["sampler"] == "dpm++" and int(ls["jump_length"]) > 0 and int(ls["jump_n_sample"]) > 1:
            out.append("lesion.sample.jump_n_sample: RePaint resampling needs a single-step sampler; set "
                       "lesion.sample.sampler to ddim or ddpm, or jump_n_sample: 1")  # fmt: skip
        if not 0 < int(ls["jump_length"]) < int(ls["steps"]) and int(ls["jump_n_sample"]) > 1:
            out.append(f"lesion.sample.jump_length: {ls['jump_length']} is not between 0 and lesion.sample.steps "
                       f"{ls['steps']}, so no jump is ever taken (RePaint off); use e.g. 10 of 20")  # fmt: skip
        dropout = float({**config["train"], **(lesion.get("train") or {})}.get("cond_dropout") or 0)
        source = (config.get("data") or {}).get("source")
        guided, against = float(ls["guidance"]) != 1.0, ls.get("guidance_against", "any")
        requested = (lesion.get("insert") or {}).get("texture", "bank")
        unconditional = [k for k, bad in (("sample.guidance", guided and against == "any"),
                                          ("insert.texture: any", requested == "any")) if bad]  # fmt: skip
        if unconditional and dropout == 0 and source != "images":
            out.append(f"lesion.{unconditional[0]}: asks the lesion model for 'any texture', a class it never "
                       "learns with lesion.train.cond_dropout 0 (LIDC nodules all have a texture); set "
                       "lesion.train.cond_dropout to e.g. 0.1, or guidance: 1 (or guidance_against: classes) and a "
                       "texture class")  # fmt: skip
        if source == "images" and requested not in ("bank", "any"):
            out.append(f"lesion.insert.texture: {requested} is a texture class, and a lesion model trained on "
                       "data.source images learns none (its nodules' texture is unknown); use bank or any (both "
                       "'any texture' there)")  # fmt: skip
        if guided and against == "classes" and source == "images":
            out.append("lesion.sample.guidance_against: classes needs a model that learnt the texture classes, and "
                       "data.source images has none (its nodules' texture is unknown); use guidance_against: any or "
                       "guidance: 1")  # fmt: skip
        if (lesion.get("model") or {}).get("init_from"):
            out.append("lesion.model.init_from: the lesion model trains from scratch (an imported network is the "
                       "whole-volume model's, model.init_from); remove the key")  # fmt: skip
        for key in ("processes", "gpus"):
            if int((lesion.get("train") or {}).get(key) or 0) > 1:
                out.append(f"lesion.train.{key}: the lesion model trains in one process on at most one GPU; "
                           "remove the key (train.processes and train.gpus are the whole-volume model's)")  # fmt: skip
    tc, key = config["train"], "lesion.train" if scale == "lesion" else "train"
    trains = bool(lesion) if scale == "lesion" else not (config["model"].get("init_from") or given_checkpoint(config))
    use_ema = ((lesion.get("sample") if scale == "lesion" else config.get("sample")) or {}).get("use_ema", True)
    if trains and use_ema and int(tc["steps"]) > 1 and int(tc.get("ema_every", 1)) >= int(tc["steps"]):
        out.append(f"{key}.ema_every: {tc['ema_every']} is not below {key}.steps {tc['steps']} (the EMA is updated "
                   "after optimizer updates 0, ema_every, 2 x ema_every, ...), so the EMA weights, which sampling uses "
                   "(use_ema), would be those after the first step; lower ema_every (1: every step)")  # fmt: skip
    if trains and use_ema and float(tc.get("ema_decay", 0.995)) >= 1 and not tc.get("ema_warmup", True):
        out.append(f"{key}.ema_decay: 1 without {key}.ema_warmup never moves the EMA weights, which sampling uses "
                   "(use_ema): they would stay the network's first weights (or those at ema_start); lower it (the "
                   "paper's 0.995) or turn ema_warmup on")  # fmt: skip
    if scale == "lesion" and trains and config["model"].get("context"):
        out += _context_region_problems(tc, lesion)
    out += _hu_floor_problems(config) if scale == "volume" else []
    window = (config.get("metrics") or {}).get("ssim_window")  # whole volumes only (the lesion view has ROI grids)
    if scale == "volume" and window and min(int(s) for s in config["preprocess"]["size"]) < int(window):
        out.append(f"metrics.ssim_window: {window} voxels is larger than the grid preprocess.size "
                   f"{list(config['preprocess']['size'])}; lower metrics.ssim_window")  # fmt: skip
    if window and int(window) % 2 == 0:  # the metrics crop their masks to the window's centre voxel
        out.append(f"metrics.ssim_window: {window} is even, so the window has no centre voxel and SSIM's map sits "
                   f"half a voxel off the masks; use {int(window) - 1} or {int(window) + 1}")  # fmt: skip
    layout = config.get("layout") or {}
    if layout and float(layout["min_lung_ml"]) > float(layout["max_lung_ml"]):
        out.append(f"layout.min_lung_ml: {layout['min_lung_ml']} is above layout.max_lung_ml "
                   f"{layout['max_lung_ml']}, so every case would fail; lower it or raise max_lung_ml")  # fmt: skip
    return out


def _grid_problems(config: Mapping[str, Any]) -> list[str]:
    """Grids the UNet cannot take (it halves them once per level after the first)."""
    out = []
    model, lesion = config["model"], config.get("lesion", {})
    grids = []  # (key, its value, the section of its network, that network's channel_mult)
    if not model.get("init_from"):  # an imported network brings its own grid
        grids.append(("preprocess.size", list(config["preprocess"]["size"]), "model", model["channel_mult"]))
    if lesion:
        mult = (lesion.get("model") or {}).get("channel_mult") or model["channel_mult"]
        grids.append(("lesion.roi.size", lesion["roi"]["size"], "lesion.model", mult))
    for key, value, section, mult in grids:
        step = 2 ** (len(mult) - 1)
        if any(int(s) % step for s in (value if isinstance(value, list) else [value])):
            out.append(
                f"{key}: {value} is not a multiple of {step} (the UNet halves its grid {len(mult) - 1} times: "
                f"{section}.channel_mult {list(mult)}); choose a size divisible by {step} or fewer levels"
            )
    return out


def _network_problems(config: Mapping[str, Any]) -> list[str]:
    """The network of this view against its grid: training crops, attention levels that exist, heads that divide
    the channels (an imported network brings its own and is not checked)."""
    model, train = config["model"], config["train"]
    if model.get("init_from"):
        return []
    size = [int(s) for s in config["preprocess"]["size"]]
    mult = [int(m) for m in model["channel_mult"]]
    step = 2 ** (len(mult) - 1)
    edge = max(size)  # the network's image_size, to which attention_resolutions are relative
    levels = [edge // 2**i for i in range(len(mult))]
    out = []
    crop = int(train.get("crop") or 0)
    if crop and (crop % step or crop > min(size)):
        out.append(
            f"train.crop: {crop} must be a multiple of {step} (model.channel_mult {mult}) and at most the grid "
            f"{size}; choose one of {[c for c in range(step, min(size) + 1, step)]} or 0 (the whole grid)"
        )
    missing = [r for r in model["attention_resolutions"] if int(r) not in levels]
    if missing:
        out.append(
            f"model.attention_resolutions: {missing} is no level of the {edge}³ network, so attention would not be "
            f"where asked (the UNet attends at the level edge // r of each r); choose from its levels {levels}"
        )
    heads, width = int(model["num_heads"]), int(model["model_channels"])
    attended = {len(mult) - 1} | {i for i, lv in enumerate(levels) if lv in model["attention_resolutions"]}
    bad = sorted({width * mult[i] for i in attended if width * mult[i] % heads})
    if bad:
        out.append(
            f"model.num_heads: {heads} does not divide the {bad} channels of an attention level (the middle block "
            "attends too); choose a divisor of model_channels x channel_mult at those levels"
        )
    return out


def _diameter_problems(section: Mapping[str, Any], key: str) -> list[str]:
    lo, hi = (float(v) for v in section.get("diameter_mm") or (0.0, 0.0))
    if lo > hi:
        return [f"{key}.diameter_mm: [{lo:g}, {hi:g}] is reversed; give [smallest, largest]"]
    return []


def _context_region_problems(train: Mapping[str, Any], lesion: Mapping[str, Any]) -> list[str]:
    """A context model's nodule-free training region (``lesion.train.context_free_diameter_mm``) against the ROI, as
    insertion's diameters: a ball as large as the ROI leaves no context to learn from."""
    lo, hi = (float(v) for v in train.get("context_free_diameter_mm") or (5.0, 15.0))
    spacing, margin = float(lesion["roi"]["spacing_mm"]), float(lesion["insert"]["margin_mm"])
    edge_mm = int(lesion["roi"]["size"]) * spacing
    if lo > hi:
        return [f"lesion.train.context_free_diameter_mm: [{lo:g}, {hi:g}] is reversed; give [smallest, largest]"]
    if lo + 2 * (margin + spacing) >= edge_mm:  # as insertion's diameters: then none fits
        return [
            f"lesion.train.context_free_diameter_mm: even the smallest, {lo:g} mm, with lesion.insert.margin_mm "
            f"{margin:g} and a voxel on either side does not fit an ROI of {edge_mm:g} mm, so the generated region "
            "would cover it and leave the context model no context; lower it (the default [5, 15]) or raise "
            "lesion.roi.size"
        ]
    return []


def _lesion_problems(lesion: Mapping[str, Any]) -> list[str]:
    """Insertion, ROI jitter and the fidelity profile against the ROI grid."""
    if not lesion:
        return []
    roi, insert, fid = lesion["roi"], lesion["insert"], lesion["fidelity"]
    spacing = float(roi["spacing_mm"])
    edge_mm = int(roi["size"]) * spacing
    out = _diameter_problems(insert, "lesion.insert")
    if float(insert["feather_mm"]) > float(insert["margin_mm"]) - spacing / 2:  # a nodule voxel's least depth
        out.append(
            f"lesion.insert.feather_mm: {insert['feather_mm']} is more than margin_mm {insert['margin_mm']} less half "
            f"an ROI voxel ({spacing / 2:g} mm): the paste-back weight would still be below 1 inside the new nodule, "
            "which the label map marks whole; lower feather_mm or raise margin_mm"
        )
    if int(roi["free_per_case"]) < 1:
        out.append(
            "lesion.roi.free_per_case: 0 leaves the lesion run no nodule-free site to insert a nodule into; set it "
            "to 1 or more, or lesion.enabled: false"
        )
    if float(insert["diameter_mm"][0]) + 2 * (float(insert["margin_mm"]) + spacing) >= edge_mm:  # then none fits
        out.append(
            f"lesion.insert.diameter_mm: even the smallest, {insert['diameter_mm'][0]} mm, with margin_mm "
            f"{insert['margin_mm']} and a voxel on either side does not fit an ROI of {edge_mm:g} mm "
            "(lesion.roi.size x spacing_mm), so no nodule could be placed; lower them or raise lesion.roi.size"
        )
    if float(roi["nodule_jitter_mm"]) >= edge_mm / 2:
        out.append(
            f"lesion.roi.nodule_jitter_mm: {roi['nodule_jitter_mm']} can move a nodule's centre out of its "
            f"{edge_mm:g} mm ROI; keep it under {edge_mm / 2:g}"
        )
    step = fid.get("profile_step_mm")
    if step is not None and float(step) < spacing:
        out.append(
            f"lesion.fidelity.profile_step_mm: {step} is finer than the ROI spacing {spacing:g} mm, so some of the "
            "margin profile's bins would hold no voxel (NaN); use at least the spacing, or null"
        )
    if float(fid["profile_mm"]) < float(step or spacing):
        out.append(
            f"lesion.fidelity.profile_mm: {fid['profile_mm']} is less than one profile bin ({float(step or spacing):g}"
            " mm); raise it"
        )
    return out


def _schedule_problems(diffusion: Mapping[str, Any]) -> list[str]:
    if diffusion.get("schedule") == "linear" and int(diffusion.get("timesteps", 1000)) < LINEAR_MIN_TIMESTEPS:
        return [
            f"diffusion.timesteps: {diffusion['timesteps']} with the linear schedule makes beta reach 1 (DDPM's "
            f"0.02 at T=1000, rescaled to T); use more than {LINEAR_MIN_TIMESTEPS - 1} timesteps or schedule: cosine"
        ]
    return []
