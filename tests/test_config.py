from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support import reverse_keys

from lungddpm.config import (
    Config,
    _merge,
    canonical,
    config_from_mapping,
    key_order_reference,
    lesion_config,
    load_config,
    validate_config,
)
from lungddpm.errors import ConfigError
from lungddpm.settings import data_settings, lesion_training_settings, weight_settings, without_later_defaults

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_is_valid_and_typed() -> None:
    cfg = load_config(REPO / "config/config.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.source == "demo"
    assert cfg.data.demo.n_scans == 12
    assert cfg.preprocess.size == (32, 32, 32)
    assert cfg.lungmask.closing_mm == 6  # filled from the schema default


def test_paper_config_needs_dicom_root() -> None:
    with pytest.raises(ConfigError, match="data.dicom_root: required"):
        load_config(REPO / "config/paper.yaml")
    cfg = load_config(REPO / "config/paper.yaml", {"data": {"dicom_root": "/data/LIDC-IDRI"}})
    assert cfg.preprocess.size == (128, 128, 128)


def test_paper_config_trains_as_lung_ddpms_train_py() -> None:
    """The original's train.py and Trainer: batch 1, 2 accumulated, lr 1e-5, Adam (AdamW without decay), no
    clipping, EMA 0.995 after every 10th step from step 2000 (a copy before), L1 on ε, cosine T=250, 100k steps;
    the lesion model (not Lung-DDPM's) keeps the defaults those change."""
    cfg = load_config(REPO / "config/paper.yaml", {"data": {"dicom_root": "/data/LIDC-IDRI"}})
    t = cfg.train
    assert (t.batch_size, t.grad_accum, t.lr, t.weight_decay, t.grad_clip, t.steps) == (1, 2, 1e-5, 0.0, 0, 100000)
    assert (t.ema_decay, t.ema_warmup, t.ema_every, t.ema_start) == (0.995, False, 10, 2000)
    assert {k: cfg.diffusion[k] for k in ("timesteps", "schedule", "prediction", "loss")} == {
        "timesteps": 250, "schedule": "cosine", "prediction": "epsilon", "loss": "l1"}  # fmt: skip
    lesion = lesion_config(cfg).train
    assert (lesion.grad_accum, lesion.grad_clip, lesion.ema_warmup, lesion.ema_every, lesion.ema_start) == (
        1, 1.0, True, 1, 0)  # fmt: skip


def test_empty_config_gets_every_default() -> None:
    cfg = validate_config({})
    assert cfg["data"]["consensus_level"] == 0.5
    assert cfg["split"] == {"train": 0.7, "val": 0.1, "test": 0.2, "seed": 0}


def test_unknown_key_is_named_with_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        validate_config({"preprocess": {"spacingmm": [1, 1, 1]}})
    text = str(err.value)
    assert "preprocess" in text and "'spacingmm' was unexpected" in text and "spacing_mm" in text


def test_out_of_range_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"data.consensus_level: 1.5 is greater than the maximum of 1"):
        validate_config({"data": {"consensus_level": 1.5}})


def test_bad_enum_and_split_sum() -> None:
    with pytest.raises(ConfigError, match="data.source: 'tcia' is not one of"):
        validate_config({"data": {"source": "tcia"}})
    with pytest.raises(ConfigError, match="train \\+ val \\+ test must sum to 1"):
        validate_config({"split": {"train": 0.5, "val": 0.1, "test": 0.1}})
    with pytest.raises(ConfigError, match="diffusion.timesteps: 20 with the linear schedule makes beta reach 1"):
        validate_config({"diffusion": {"schedule": "linear", "timesteps": 20}})
    assert validate_config({"diffusion": {"schedule": "linear", "timesteps": 21}})["diffusion"]["snr_gamma"] is None


def test_a_later_key_at_its_schema_default_is_left_out_and_any_other_value_kept() -> None:
    cfg = validate_config({})
    for section in (cfg["sample"], cfg["lesion"]["sample"]):  # the value that does what was done before the key
        assert "timestep_spacing" in section and "timestep_spacing" not in without_later_defaults(section)
        assert without_later_defaults({**section, "timestep_spacing": "quadratic"})["timestep_spacing"] == "quadratic"


def test_keys_that_change_how_a_training_runs_leave_its_params_alone() -> None:
    """A train rule's params (the weight settings) of a workdir made before ema_every / ema_start existed, or with
    another process count, are unchanged; an EMA schedule of its own changes them."""
    train = validate_config({})["train"]
    old = {k: v for k, v in train.items() if k not in ("ema_every", "ema_start")}
    assert weight_settings(train) == weight_settings(old) == weight_settings({**train, "processes": 4})
    assert weight_settings({**train, "ema_every": 10})["ema_every"] == 10
    assert "gpus" not in weight_settings(train) and weight_settings(train)["processes"] == 1


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found; run lungddpm in the workflow's folder"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config.yaml with the command line's --set values: invalid configuration"):
        load_config(REPO / "config/config.yaml", {"train": {"stpes": 10}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_strings_from_the_command_line_are_coerced() -> None:
    # snakemake --config 'preprocess={size: [64, 64, 64]}' delivers nested values as strings
    cfg = validate_config(
        {
            "preprocess": {"size": ["64", "64", "48"], "fine_spacing_mm": "2.5"},
            "data": {"dicom_root": "null", "consensus_level": "0.25"},
        }
    )
    assert cfg["preprocess"]["size"] == [64, 64, 48] and cfg["preprocess"]["fine_spacing_mm"] == 2.5
    assert cfg["data"]["consensus_level"] == 0.25
    assert cfg["data"]["dicom_root"] is None  # YAML's null, as the text Snakemake passes, where null is allowed
    # a whole float's text where an integer is asked, as a file's 24.0 reads (it was refused from --config only)
    assert validate_config({"model": {"model_channels": "24.0"}})["model"]["model_channels"] == 24
    with pytest.raises(ConfigError, match=r"model.model_channels: 24.5 is not of type 'integer'"):
        validate_config({"model": {"model_channels": "24.5"}})
    cfg = validate_config(
        {"data": {"source": "images", "images": {"ct_dir": "/ct", "label_dir": "~"}}, "sample": {"checkpoint": "null"}}
    )
    assert cfg["data"]["images"]["label_dir"] is None and cfg["sample"]["checkpoint"] is None
    cfg = validate_config({"train": {"name": "null"}})
    assert cfg["train"]["name"] == "null"  # a string where only a string is allowed stays a string
    with pytest.raises(ConfigError, match="preprocess.size.0: 'big' is not of type 'integer'"):
        validate_config({"preprocess": {"size": ["big", "64", "64"]}})


def test_folds_from_the_command_line_are_ints_and_all_stays() -> None:
    """snakemake --config 'segmentation={folds: [0, 1]}' delivers the folds as strings."""
    assert validate_config({"segmentation": {"folds": ["0", "1"]}})["segmentation"]["folds"] == [0, 1]
    assert validate_config({"segmentation": {"folds": ["all"]}})["segmentation"]["folds"] == ["all"]
    assert validate_config({"segmentation": {"folds": [4, "all"]}})["segmentation"]["folds"] == [4, "all"]
    with pytest.raises(ConfigError, match=r"segmentation.folds.1: '5' is not one of \[0, 1, 2, 3, 4, 'all'\]"):
        validate_config({"segmentation": {"folds": ["0", "5"]}})
    with pytest.raises(ConfigError, match=r"segmentation.folds.0: 'ALL' is not one of \[0, 1, 2, 3, 4, 'all'\]"):
        validate_config({"segmentation": {"folds": ["ALL"]}})


def test_merge_is_snakemakes_update_config() -> None:
    """Mappings merged key by key, lists and scalars replaced, a mapping over a scalar taken whole."""
    from snakemake.utils import update_config

    def both(base: dict, extra: dict) -> tuple[dict, dict]:
        ours, theirs = yaml.safe_load(yaml.safe_dump(base)), yaml.safe_load(yaml.safe_dump(base))
        _merge(ours, extra)
        update_config(theirs, yaml.safe_load(yaml.safe_dump(extra)))
        return ours, theirs

    base = {"a": {"b": [1, 2], "c": {"d": 1, "e": 2}}, "f": 3, "g": None}
    extra = {"a": {"b": [9], "c": {"e": 5}}, "f": {"x": 1}, "g": {"y": 2}, "h": [1]}
    ours, theirs = both(base, extra)
    assert ours == theirs == {"a": {"b": [9], "c": {"d": 1, "e": 5}}, "f": {"x": 1}, "g": {"y": 2}, "h": [1]}


def test_grids_the_network_cannot_take_are_refused_at_parse_time() -> None:
    with pytest.raises(
        ConfigError, match=r"preprocess.size: \[31, 32, 32\] is not a multiple of 4 .*channel_mult \[1, 2, 2\]"
    ):
        validate_config({"preprocess": {"size": [31, 32, 32]}, "model": {"channel_mult": [1, 2, 2]}})
    with pytest.raises(ConfigError, match=r"lesion.roi.size: 30 is not a multiple of 4 .*lesion.model.channel_mult"):
        validate_config({"lesion": {"roi": {"size": 30}, "model": {"channel_mult": [1, 2, 4]}}})
    # an imported network brings its own grid: preprocess.size is resampled to it, so any size goes
    validate_config({"preprocess": {"size": [31, 32, 32]}, "model": {"init_from": "released.pt"}})
    with pytest.raises(ConfigError, match=r"metrics.ssim_window: 9 voxels is larger than the grid preprocess.size "
                       r"\[8, 16, 16\]; lower metrics.ssim_window"):  # fmt: skip
        validate_config({"preprocess": {"size": [8, 16, 16]}, "model": {"channel_mult": [1, 2]},
                         "metrics": {"ssim_window": 9}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"metrics.ssim_window: 8 is even, .* use 7 or 9"):
        validate_config({"metrics": {"ssim_window": 8}})
    # ROIs smaller than the window are fine: SSIM is computed on whole volumes only (the lesion view's grid is the ROI)
    small_rois = {"lesion": {"roi": {"size": 16, "spacing_mm": 2.5}}, "metrics": {"ssim_window": 17}}
    assert lesion_config(load_config(REPO / "config/config.yaml", small_rois)).preprocess.size == (16, 16, 16)


@pytest.mark.parametrize(
    "config, message",
    [
        # a crop the UNet cannot halve, or larger than the grid: refused before the ROIs are extracted
        ({"train": {"crop": 10}}, r"train.crop: 10 must be a multiple of 4 .* choose one of \[4, 8, .*32\]"),
        ({"train": {"crop": 48}}, r"train.crop: 48 must be .* at most the grid \[32, 32, 32\]"),
        # attention at a grid no level has: it would silently attend in the middle block only
        (
            {"model": {"attention_resolutions": [3]}},
            r"attention_resolutions: \[3\] is no level of the 32³ .*\[32, 16, 8\]",
        ),
        ({"model": {"num_heads": 5}}, r"model.num_heads: 5 does not divide the \[48\] channels"),
        # HU the int16 volumes cannot hold (padding would wrap round to +25536)
        ({"preprocess": {"padding_hu": -40000}}, r"preprocess.padding_hu: -40000 is less than the minimum of -32768"),
        ({"preprocess": {"max_hu": 40000}}, r"preprocess.max_hu: 40000 is greater than the maximum of 32767"),
        # the paste-back's feather reaching into the new nodule: a faded nodule that the label map marks whole
        ({"lesion": {"insert": {"margin_mm": 1.25, "feather_mm": 5.0}}}, r"feather_mm: 5.0 is more than margin_mm"),
        # equal to the margin: the nodule's outer voxels lie half a voxel less deep (110 of 257 pasted below 1)
        ({"lesion": {"insert": {"margin_mm": 3.75, "feather_mm": 3.75}}}, r"less half an ROI voxel \(0.625 mm\)"),
        ({"lesion": {"roi": {"free_per_case": 0}}}, r"free_per_case: 0 leaves the lesion run no nodule-free site"),
        ({"lesion": {"insert": {"diameter_mm": [15, 5]}}}, r"lesion.insert.diameter_mm: \[15, 5\] is reversed"),
        ({"layout_edit": {"diameter_mm": [30, 10]}}, r"layout_edit.diameter_mm: \[30, 10\] is reversed"),
        ({"lesion": {"insert": {"diameter_mm": [33, 36]}}}, r"the smallest, 33 mm, .* does not fit an ROI of 40 mm"),
        ({"lesion": {"roi": {"nodule_jitter_mm": 20}}}, r"nodule_jitter_mm: 20 can move a nodule's centre out"),
        ({"lesion": {"fidelity": {"profile_step_mm": 0.5}}}, r"profile_step_mm: 0.5 is finer than the ROI spacing"),
        ({"lesion": {"fidelity": {"profile_mm": 1.0}}}, r"profile_mm: 1.0 is less than one profile bin \(1.25 mm\)"),
        # a reversed window trains on constant images; steps past the schedule fail only after training
        ({"intensity": {"hu_window": [400, -1000]}}, r"intensity.hu_window: \[400, -1000\] is reversed or empty"),
        ({"intensity": {"hu_window": [-1000, -400]}}, r"lesion.texture_hu: .* must lie inside intensity.hu_window"),
        # inside the window but at its ends: its level would meet "any texture" (texture_levels failed in training)
        ({"intensity": {"hu_window": [-1000, 20]}}, r"texture_hu: .* clear of its ends: between -949 and -5.5 HU"),
        ({"lesion": {"texture_hu": [-950, -300, 0]}}, r"texture_hu: \[-950.0, -300.0, 0.0\] must lie .*-930 and 365"),
        # the lesion sections' own values, typed as their sections (a ValueError / TypeError inside the checks)
        ({"lesion": {"diffusion": {"timesteps": "1k"}}}, r"lesion.diffusion.timesteps: '1k' is not of type 'integer'"),
        ({"lesion": {"model": {"channel_mult": 5}}}, r"lesion.model.channel_mult: 5 is not of type 'array'"),
        ({"lesion": {"train": {"cond_dropout": "high"}}}, r"lesion.train.cond_dropout: 'high' is not of type"),
        ({"lesion": {"train": {"gpus": "one"}}}, r"lesion.train.gpus: 'one' is not of type 'integer'"),
        ({"sample": {"steps": 251}}, r"sample.steps: 251 steps exceed diffusion.timesteps 250"),
        ({"train": {"preview_sampler_steps": 300}}, r"train.preview_sampler_steps: 300 steps exceed diffusion"),
        ({"lesion": {"diffusion": {"timesteps": 10}}}, r"lesion.sample.steps: 20 steps exceed the lesion model's"),
        ({"lesion": {"sample": {"jump_length": 5, "jump_n_sample": 2}}}, r"RePaint resampling needs a single-step"),
        ({"lesion": {"train": {"processes": 2}}}, r"lesion.train.processes: the lesion model trains in one process"),
        # RePaint that never jumps; the unconditional class a model without condition dropout never learns
        (
            {"lesion": {"sample": {"sampler": "ddim", "jump_length": 20, "jump_n_sample": 3}}},
            r"lesion.sample.jump_length: 20 is not between 0 and lesion.sample.steps 20, so no jump is ever taken",
        ),
        (  # jump_length 0: RePaint off without a word before
            {"lesion": {"sample": {"sampler": "ddim", "jump_length": 0, "jump_n_sample": 3}}},
            r"lesion.sample.jump_length: 0 is not between 0 and lesion.sample.steps 20",
        ),
        (
            {"lesion": {"sample": {"guidance": 3.0}, "train": {"cond_dropout": 0.0}}},
            r"lesion.sample.guidance: asks the lesion model for 'any texture', a class it never learns",
        ),
        ({"lesion": {"insert": {"texture": "any"}, "train": {"cond_dropout": 0}}}, r"lesion.insert.texture: any: asks"),
        ({"layout": {"min_lung_ml": 13000}}, r"layout.min_lung_ml: 13000 is above layout.max_lung_ml 12000"),
        ({"data": {"cases": ["LIDC-IDRI-0001"]}}, r"data.cases: a list of LIDC patients, which data.source 'demo'"),
        # a data folder without its source: the phantom demo ran in its place, without a word
        (
            {"data": {"dicom_root": "/data/LIDC-IDRI"}},
            r"data.dicom_root: '/data/LIDC-IDRI' is read with data.source lidc only, and data.source is 'demo' \(the "
            r"phantom demo would run instead\); add source: lidc",
        ),
        ({"data": {"images": {"ct_dir": "ct"}}}, r"data.images.ct_dir: 'ct' is read with data.source images only"),
        (
            {"data": {"source": "lidc", "dicom_root": "/d", "images": {"label_dir": "seg"}}},
            r"data.images.label_dir: 'seg' .* and data.source is 'lidc' \(the lidc data would run instead\)",
        ),
        # an empty folder is the workflow's own folder: scanned for label maps (and its volumes paired as labels)
        (
            {"data": {"source": "images", "images": {"ct_dir": "ct", "label_dir": ""}}},
            r"data.images.label_dir: '' should be non-empty",
        ),
        ({"metrics": {"features": {"clip_hu": [200, -1000]}}}, r"metrics.features.clip_hu: \[200, -1000\] is reversed"),
        ({"metrics": {"features": {"extractor": "medicalnet"}}}, r"metrics.features.weights: the medicalnet extractor"),
        # a MedicalNet file given with the astra extractor: astra's features were computed without a word
        (
            {"metrics": {"features": {"weights": "/data/resnet_50.pth"}}},
            r"metrics.features.weights: '/data/resnet_50.pth' is read by the medicalnet extractor only, and "
            r"metrics.features.extractor is 'astra'; set extractor: medicalnet, or remove weights",
        ),
    ],
)
def test_settings_that_would_fail_late_or_silently_are_refused(config: dict, message: str) -> None:
    demo = yaml.safe_load((REPO / "config/config.yaml").read_text())
    _merge(demo, config)
    with pytest.raises(ConfigError, match=message):
        lesion_config(config_from_mapping(demo))  # the whole config, then the lesion scale's merged view


def test_the_range_checks_leave_a_given_model_and_a_disabled_lesion_scale_alone() -> None:
    """sample.checkpoint brings its own schedule (1000 steps of a T=1000 model are fine); a disabled lesion scale's
    settings are not checked (its texture HU outside a lung-only window, its steps past its schedule)."""
    given = {"sample": {"checkpoint": "/models/t1000.pt", "steps": 1000, "sampler": "ddpm"}}
    assert load_config(REPO / "config/config.yaml", given).raw["sample"]["steps"] == 1000
    # the model trained here, named by another path, is not a given one: its schedule is diffusion's
    own = {"sample": {**given["sample"], "checkpoint": str(Path("results/x/../models/demo/checkpoint.pt").absolute())}}
    with pytest.raises(ConfigError, match=r"sample.steps: 1000 steps exceed diffusion.timesteps 250"):
        load_config(REPO / "config/config.yaml", own)
    off = {"lesion": {"enabled": False, "diffusion": {"timesteps": 10}, "insert": {"feather_mm": 99}},
           "intensity": {"hu_window": [-1000, -400]},
           "segmentation": {"enabled": False}}  # fmt: skip
    assert load_config(REPO / "config/config.yaml", off).raw["lesion"]["enabled"] is False
    # nor through the lesion view that the CLI and the Snakefile build whatever the switch (a whole-volume network
    # of 3 heads, or an ROI grid its network cannot halve, were refused as lesion problems)
    for edit in ({"model": {"num_heads": 3}, "segmentation": {"scale": "whole"}},
                 {"lesion": {**off["lesion"], "roi": {"size": 30}}}):  # fmt: skip
        lesion_config(load_config(REPO / "config/config.yaml", {**off, **edit}))
    # off, but the segmentation still reads it (ROIs, or an arm of lesion-run nodules): checked, at parse time
    for seg in ({"scale": "lesion"}, {"scale": "whole", "arms": [{"name": "a", "real": True, "synthetic_fraction": 1.0,
                                                                   "synthetic_source": "lesion"}]}):  # fmt: skip
        with pytest.raises(ConfigError, match=r"lesion.diffusion.timesteps|feather"):
            load_config(REPO / "config/config.yaml", {**off, "segmentation": {"enabled": True, **seg}})


def test_the_lesion_networks_crop_and_attention_are_checked_on_the_roi_grid() -> None:
    demo = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg = config_from_mapping(demo)
    assert lesion_config(cfg).train.crop == 16  # the demo: 16³ crops of 32³ ROIs, attention at 8³
    _merge(demo, {"lesion": {"roi": {"size": 64}}})  # a 64³ ROI alone: attention at 8³ is no level of [1, 2, 4]
    with pytest.raises(ConfigError, match=r"(?s)lesion scale .*attention_resolutions: \[8\] is no level of the 64³"):
        lesion_config(config_from_mapping(demo))


def test_the_packaged_schema_is_the_workflow_schema() -> None:
    """lungddpm/schema.yaml (the installed wheel's copy) is a link to config/schema.yaml, never a diverging copy."""
    packaged = REPO / "lungddpm/schema.yaml"
    assert packaged.is_symlink() and packaged.resolve() == (REPO / "config/schema.yaml").resolve()


def test_the_schema_is_parsed_once_as_pyyaml_reads_it_and_each_caller_gets_its_own_copy() -> None:
    """The cached libyaml parse equals PyYAML's pure-Python one; a caller that fills its copy in (defaults)
    changes no later caller's."""
    from lungddpm.config import load_schema

    first = load_schema()
    assert first == yaml.safe_load((REPO / "config/schema.yaml").read_text())
    first["properties"]["data"]["properties"].clear()
    assert load_schema()["properties"]["data"]["properties"]["source"]["default"] == "demo"


SCHEMA_KEYWORDS = {"type", "properties", "additionalProperties", "default", "description", "enum", "minimum",
                   "maximum", "exclusiveMinimum", "exclusiveMaximum", "items", "minItems", "maxItems", "required",
                   "oneOf", "anyOf", "allOf", "pattern", "$schema", "title", "uniqueItems", "minLength", "const",
                   "patternProperties", "not", "if", "then", "else"}  # fmt: skip


def test_every_schema_node_holds_only_json_schema_keywords() -> None:
    """An unquoted description with a comma in a YAML flow mapping ends at the comma and turns the rest into keys
    (``{description: from (seed, case, k).}`` -> keys ``case``, ``k).``): the description a user reads is cut."""

    def stray(node: object, path: str) -> list[str]:
        if not isinstance(node, dict):
            return [k for i, x in enumerate(node) for k in stray(x, f"{path}.{i}")] if isinstance(node, list) else []
        found = [f"{path}: {k!r}" for k in node if k not in SCHEMA_KEYWORDS]
        for k, v in node.items():
            if k in ("properties", "patternProperties"):
                found += [x for name, sub in v.items() for x in stray(sub, f"{path}.{name}")]
            elif k not in ("default", "enum", "const", "description"):
                found += stray(v, path)
        return found

    assert stray(yaml.safe_load((REPO / "config/schema.yaml").read_text()), "schema") == []


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_paper_config_is_the_same_through_snakemake_merged_over_the_demo() -> None:
    """``snakemake --configfile config/paper.yaml`` merges paper.yaml over the Snakefile's config/config.yaml, so a
    key that only the demo sets (the demo's tiny nnU-Net, its lesion crops) would leak into a paper run."""
    import copy

    import yaml
    from snakemake.utils import update_config

    demo = yaml.safe_load((REPO / "config/config.yaml").read_text())
    paper = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    root = {"data": {"dicom_root": "/data/LIDC-IDRI"}}
    merged = copy.deepcopy(demo)
    update_config(merged, paper)
    update_config(merged, root)
    update_config(paper, root)
    for cfg in (merged, paper):
        cfg["data"].pop("demo", None)  # the phantom's settings: read only when data.source is demo
    alone, through = _leaves(validate_config(paper)), _leaves(validate_config(merged))
    assert {k: (through[k], alone.get(k)) for k in through if through[k] != alone.get(k)} == {}


def test_canonical_order_follows_the_shipped_config_whatever_a_files_order() -> None:
    shipped = validate_config(yaml.safe_load((REPO / "config/config.yaml").read_text()))
    assert repr(key_order_reference(REPO / "config/config.yaml", {})) == repr(shipped)  # the same order, unvalidated
    assert repr(canonical(shipped, shipped)) == repr(shipped)  # a workdir made with the shipped order keeps its params
    flipped = reverse_keys(shipped)
    assert flipped == shipped and repr(flipped) != repr(shipped)  # equal values, another repr: Snakemake would rerun
    assert repr(canonical(flipped, shipped)) == repr(shipped)
    arms = canonical(reverse_keys(shipped["segmentation"]["arms"]), shipped["segmentation"]["arms"][:1])
    assert [list(a) for a in arms] == [list(shipped["segmentation"]["arms"][0])] * 2  # items against the first
    extra = canonical({"z": 1, "b": {"y": 2, "x": 3}, "a": 4}, {"b": {}, "a": 0})
    assert repr(extra) == repr({"b": {"x": 3, "y": 2}, "a": 4, "z": 1})  # unknown keys after, sorted
    # the same number as an int or a float: written as the shipped file has it (it was -400 there, -400.0 here)
    retyped = validate_config({"lungmask": {"threshold_hu": -400.0}, "preprocess": {"spacing_mm": [10, 10, 10]}})
    assert repr(retyped["lungmask"]["threshold_hu"]) == "-400.0" and shipped["lungmask"]["threshold_hu"] == -400
    same = canonical(retyped, shipped)
    assert repr(same["lungmask"]) == repr(shipped["lungmask"]) and repr(same["preprocess"]) == repr(
        shipped["preprocess"]
    )
    assert repr(canonical({"a": [2.5, True, 3.0]}, {"a": [1]})) == repr({"a": [2.5, True, 3]})  # bools left alone
    assert repr(canonical({"a": 2**53 + 1}, {"a": 1.0})) == repr({"a": 2**53 + 1})  # no float holds it: kept


def test_the_key_order_reference_needs_no_valid_shipped_file(tmp_path: Path) -> None:
    """config.yaml edited to source: lidc, its dicom_root given on the command line: valid merged, not alone."""
    edited = tmp_path / "config.yaml"
    edited.write_text("data: {source: lidc}\nsplit: {seed: 3}\n")
    with pytest.raises(ConfigError, match="data.dicom_root: required"):
        load_config(edited)
    ref = key_order_reference(edited, {})
    assert list(ref)[:2] == ["data", "split"] and ref["split"]["train"] == 0.7  # its order, the defaults filled
    assert key_order_reference(tmp_path / "missing.yaml", {"x": 1}) == {"x": 1}


def test_missing_dicom_root_hint_is_a_config_snakemake_accepts() -> None:
    """The hint's ``--config`` argument parses (Snakemake refuses dotted keys) into the key it names."""
    import shlex

    from snakemake.cli import parse_config

    with pytest.raises(ConfigError) as err:
        validate_config({"data": {"source": "lidc"}})
    hint = str(err.value).split("pass snakemake --config ", 1)[1]
    arg = shlex.split(hint)[0]
    assert parse_config([arg])["data"] == {"source": "lidc", "dicom_root": "/path/to/LIDC-IDRI"}


def _lesion_training(overrides: dict) -> dict:
    raw = yaml.safe_load((REPO / "config/config.yaml").read_text())
    _merge(raw, overrides)
    return lesion_training_settings(lesion_config(config_from_mapping(raw)))


def test_lesion_training_settings_follow_the_merged_lesion_view_only() -> None:
    """train_lesion's params: a whole-volume key that lesion.* overrides or never reaches leaves them alone; a key
    the lesion model inherits, or a lesion.* edit, changes them."""
    base = _lesion_training({})
    whole_only = {"train": {"steps": 9999, "gpus": 1, "processes": 1}, "model": {"model_channels": 48}}
    assert _lesion_training(whole_only) == base
    assert _lesion_training({"preprocess": {"size": [16, 16, 16], "spacing_mm": [20.0, 20.0, 20.0]}}) == base
    assert _lesion_training({"lesion": {"train": {"steps": 1601}}})["train"]["steps"] == 1601
    inherited = _lesion_training({"train": {"lr_warmup_steps": 21}})
    assert inherited != base and inherited["train"]["lr_warmup_steps"] == 21
    assert _lesion_training({"intensity": {"hu_window": [-1100, 500]}}) != base
    assert _lesion_training({"lesion": {"roi": {"size": 16}}})["preprocess"]["size"] == [16, 16, 16]
    assert base["model"]["model_channels"] == 16 and "init_from" not in base["model"]
    assert _lesion_training({"lesion": {"model": {"use_checkpoint": True}}}) == base  # memory for time, not weights


def test_the_lesion_jobs_take_the_gpu_that_train_gpus_requests_but_never_ddp() -> None:
    """train.gpus: 1 (config/paper.yaml) gives the lesion jobs a GPU (their gpu resource was 0: unlimited beside the
    training); at most one, in one process; lesion.train.gpus: 0 keeps them off it."""
    paper = load_config(REPO / "config/paper.yaml", {"data": {"dicom_root": "/d"}})
    assert (paper.train.gpus, lesion_config(paper).train.gpus, lesion_config(paper).train.processes) == (1, 1, 1)
    ddp = load_config(REPO / "config/config.yaml", {"train": {"gpus": 4, "processes": 4}})
    assert (lesion_config(ddp).train.gpus, lesion_config(ddp).train.processes) == (1, 1)
    off = load_config(REPO / "config/paper.yaml", {"data": {"dicom_root": "/d"}, "lesion": {"train": {"gpus": 0}}})
    assert lesion_config(off).train.gpus == 0


def test_a_cases_rules_see_how_a_case_is_made_not_which_cases_or_where_they_lie() -> None:
    """preprocess / rois / the lesion run's params: adding a case (data.cases, demo.n_scans) or moving the LIDC
    download (dicom_root) changes no other case's; the consensus level, readers or (of a demo case) a phantom setting
    do."""
    data = validate_config({"data": {"source": "lidc", "dicom_root": "/a", "cases": ["LIDC-IDRI-0001"]}})["data"]
    base = data_settings(data, case=True)
    assert data_settings({**data, "dicom_root": "/b", "cases": ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]}, True) == base
    assert data_settings({**data, "demo": {**data["demo"], "n_scans": 40}}, True) == base
    assert data_settings({**data, "consensus_level": 0.25}, True) != base
    # a phantom setting shapes a demo case, not a LIDC one (another source's section is held at its defaults)
    assert data_settings({**data, "demo": {**data["demo"], "noise_hu": 1.0}}, True) == base
    demo = {**data, "source": "demo"}
    assert data_settings({**demo, "demo": {**data["demo"], "noise_hu": 1.0}}, True) != data_settings(demo, True)
    assert set(data) - set(base) == {"cases", "dicom_root"}
    # the split's: moving the download reran it, and with its table every training (not the cases: they are its own)
    split = data_settings(data)
    assert data_settings({**data, "dicom_root": "/b"}) == split and set(data) - set(split) == {"dicom_root"}
    # a check-only key (it refuses input, shapes nothing) in no rule's params: its arrival reran all 83 demo jobs
    assert "max_air_nodule_ml" in data["images"]
    for case in (True, False):
        images = {**data["images"], "max_air_nodule_ml": 500}
        assert data_settings({**data, "images": images}, case) == data_settings(data, case)
        assert "max_air_nodule_ml" not in data_settings(data, case)["images"]


@pytest.mark.parametrize("data", [None, {"images": None}, [1, 2]])
def test_an_emptied_section_is_named_not_a_traceback(data: object) -> None:
    """A section whose keys are all commented out reads as null: the schema names it (an AttributeError before)."""
    where = "data.images" if isinstance(data, dict) else "data"
    with pytest.raises(ConfigError, match=rf"{where}: .* is not of type 'object'"):
        validate_config({"data": data})


def test_guidance_against_the_classes_needs_no_condition_dropout() -> None:
    """Only 'any texture' guidance asks the model for a class learnt through cond_dropout."""
    over = {"lesion": {"sample": {"guidance": 2.0, "guidance_against": "classes"}, "train": {"cond_dropout": 0.0}}}
    assert load_config("config/config.yaml", over).raw["lesion"]["sample"]["guidance_against"] == "classes"
    with pytest.raises(ConfigError, match=r"guidance_against: 'all' is not one of \['any', 'classes'\]"):
        load_config("config/config.yaml", {"lesion": {"sample": {"guidance_against": "all"}}})
    # own images: every nodule of unknown texture, so the model never learns the classes it would average
    images = {"data": {"source": "images", "images": {"ct_dir": "ct"}}, **over}
    with pytest.raises(ConfigError, match=r"guidance_against: classes needs a model that learnt the texture classes"):
        load_config("config/config.yaml", images)


def test_own_images_insert_any_texture_for_bank_and_refuse_a_class() -> None:
    """A lesion model trained on data.source images saw its nodules as 'any texture' only: bank (each bank
    nodule's LIDC class, a level it never saw, before) is asked as any, in the lesion run and in what its rule and
    items compare; a class is refused. LIDC and the demo keep bank."""
    from lungddpm.settings import lesion_insert

    images = {"data": {"source": "images", "images": {"ct_dir": "ct"}}}
    assert lesion_insert(load_config("config/config.yaml", images).raw)["texture"] == "any"
    assert lesion_insert(load_config("config/config.yaml").raw)["texture"] == "bank"
    solid = {**images, "lesion": {"insert": {"texture": "solid"}}}
    with pytest.raises(ConfigError, match=r"lesion.insert.texture: solid is a texture class, and a lesion model "
                       r"trained on data.source images learns none"):  # fmt: skip
        load_config("config/config.yaml", solid)


@pytest.mark.parametrize(("over", "message"), [
    ({"texture_hu": [-300, -300, 0]}, r"lesion.texture_hu: \[-300.0, -300.0, 0.0\] gives two texture classes"),
    ({"model": {"init_from": "lesion.pt"}}, r"lesion.model.init_from: the lesion model trains from scratch"),
])  # fmt: skip
def test_lesion_keys_that_would_merge_classes_or_be_ignored_are_refused(over: dict, message: str) -> None:
    """Accepted before: two classes at one level merged (and guidance against the classes indexed past the end
    of the shortened level list, hours in), and lesion.model.init_from was dropped without a word."""
    with pytest.raises(ConfigError, match=message):
        load_config("config/config.yaml", {"lesion": over})


def test_a_context_models_nodule_free_region_must_fit_the_roi() -> None:
    """[100, 200] mm made the whole 40 mm ROI the generated region of every nodule-free ROI (no context learnt),
    and a reversed range drew from it anyway; both were accepted."""
    too_big = r"even the smallest, 100 mm, with lesion.insert.margin_mm 3.75 and a voxel on either side does not fit"
    for diameters, message in (([100, 200], too_big), ([15, 5], r"\[15, 5\] is reversed")):
        over = {"lesion": {"model": {"context": True}, "train": {"context_free_diameter_mm": diameters}}}
        with pytest.raises(ConfigError, match=rf"lesion.train.context_free_diameter_mm: {message}"):
            lesion_config(load_config("config/config.yaml", over))
    fits = {"lesion": {"model": {"context": True}, "train": {"context_free_diameter_mm": [5, 20]}}}
    assert lesion_config(load_config("config/config.yaml", fits)).train.context_free_diameter_mm == [5, 20]
    no_context = {"lesion": {"model": {"context": False}, "train": {"context_free_diameter_mm": [100, 200]}}}  # unread
    assert lesion_config(load_config("config/config.yaml", no_context)).train.context_free_diameter_mm[1] == 200


def test_lung_mask_thresholds_must_lie_above_the_hu_floor() -> None:
    """The readers raise every HU below preprocess.padding_hu to it: at -940 no voxel is below the airway threshold
    (-950), and the trachea and bronchi stayed in the lungs with a log line only."""
    with pytest.raises(ConfigError, match=r"lungmask.airway_threshold_hu: -950 HU is not above preprocess.padding_hu "
                       r"-940 HU, .*trachea and main bronchi would stay in the lungs\); raise"):  # fmt: skip
        load_config(REPO / "config/config.yaml", {"preprocess": {"padding_hu": -940}})
    with pytest.raises(ConfigError, match=r"lungmask.threshold_hu: -950 HU is not above .* -920 HU.*no lung would be"):
        load_config(
            REPO / "config/config.yaml", {"preprocess": {"padding_hu": -920}, "lungmask": {"threshold_hu": -950}}
        )
    with pytest.raises(ConfigError, match=r"lungmask.airway_threshold_hu: -1024 HU is not above .* -1024 HU"):
        load_config(REPO / "config/config.yaml", {"lungmask": {"airway_threshold_hu": -1024}})  # the schema's minimum
    assert load_config(REPO / "config/config.yaml", {"lungmask": {"airway_threshold_hu": -1000}}).raw["lungmask"]
    # a floor at lung HU (-960 and above): room air raised to it reads as lung to the edge repair and the room-air
    # pocket test (accepted up to -900 before); thresholds below it pass with it
    low = {"preprocess": {"padding_hu": -955}, "lungmask": {"threshold_hu": -400, "airway_threshold_hu": -950}}
    with pytest.raises(ConfigError, match=r"preprocess.padding_hu: -955 HU is not below -960 HU, the darkest lung"):
        load_config(REPO / "config/config.yaml", low)
    assert load_config(REPO / "config/config.yaml", {"preprocess": {"padding_hu": -961}}).preprocess.padding_hu == -961
    half, narrow = {"layout": {"min_side_fraction": 0.5}}, {"lungmask": {"airway_max_diameter_mm": 5}}
    for over, message in (
        (half, "greater than or equal to the maximum of 0.5"),
        (narrow, "less than the minimum of 6"),
    ):
        with pytest.raises(ConfigError, match=message):  # every case failed / no trachea seed could be found
            load_config(REPO / "config/config.yaml", over)


def test_an_ema_that_would_update_once_is_refused_in_both_models() -> None:
    """ema_every at or above steps: the EMA (sampled by default) held the weights after the first optimizer step
    (updates 0, ema_every, ... of 0..steps-1)."""
    config = REPO / "config/config.yaml"
    with pytest.raises(ConfigError, match=r"train.ema_every: 50 is not below train.steps 50 \(the EMA is updated"):
        load_config(config, {"train": {"steps": 50, "ema_every": 50}})
    demo = load_config(config, {"lesion": {"train": {"steps": 50, "ema_every": 60}}})
    with pytest.raises(ConfigError, match=r"lesion.train.ema_every: 60 is not below lesion.train.steps 50"):
        lesion_config(demo)
    assert load_config(config, {"train": {"steps": 50, "ema_every": 49}}).train.ema_every == 49
    unused = {"train": {"steps": 50, "ema_every": 50}, "sample": {"use_ema": False}}  # the EMA is never sampled
    assert load_config(config, unused).train.ema_every == 50
    assert load_config(config, {"train": {"steps": 1, "ema_every": 1}}).train.steps == 1  # one step: its EMA
    # a decay of 1 without the warm-up never moves the EMA: sampling used the untrained weights (accepted before)
    frozen = {"ema_decay": 1, "ema_warmup": False}
    with pytest.raises(ConfigError, match=r"train.ema_decay: 1 without train.ema_warmup never moves the EMA weights"):
        load_config(config, {"train": frozen})
    with pytest.raises(ConfigError, match=r"lesion.train.ema_decay: 1 without lesion.train.ema_warmup never moves"):
        lesion_config(load_config(config, {"lesion": {"train": frozen}}))
    assert load_config(config, {"train": {"ema_decay": 1}}).train.ema_decay == 1  # the warm-up moves it
    assert load_config(config, {"train": frozen, "sample": {"use_ema": False}}).train.ema_decay == 1


def test_whole_number_floats_become_integers_and_fractions_are_refused() -> None:
    """16.0 passed the schema as an integer and reached torch as a float (TypeError building the network)."""
    cfg = load_config(REPO / "config/config.yaml", {"model": {"model_channels": 16.0}, "train": {"steps": 400.0}})
    assert type(cfg.model["model_channels"]) is int and type(cfg.train.steps) is int and cfg.train.steps == 400
    with pytest.raises(ConfigError, match=r"model.model_channels.*16.5"):
        load_config(REPO / "config/config.yaml", {"model": {"model_channels": 16.5}})
