"""What rule params, a checkpoint's resume check and digest, and sampled items' provenance compare of the config:
the keys that shape a result, with those that only change how a job runs left out or held at one value, and keys
added after workdirs existed left out at their old behaviour, so that neither reruns anything."""

from __future__ import annotations

import copy
import functools
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config


def schema_defaults(section: str) -> dict[str, Any]:
    """A copy of the schema's defaults of config ``section`` (validated once)."""
    return copy.deepcopy(_defaults()[section])


@functools.cache
def _defaults() -> dict[str, Any]:
    from .config import validate_config

    return validate_config({})


def at_defaults(section: Mapping[str, Any], keys: Collection[str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``section`` with its ``keys`` at their ``defaults`` (keys a rule does not read, compared at one value so that
    editing one reruns nothing, and a workdir made before keeps its params)."""
    return {k: defaults[k] if k in keys else v for k, v in section.items()}


def set_keys(section: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a config section that are not left at null: what a resume fingerprint and a rule's params
    compare, so that a key added later with a null default (``diffusion.snr_gamma``) changes neither."""
    return {k: v for k, v in section.items() if v is not None}


# train keys that do not shape the weights: a finished training resumed with only these changed is handed back as is
RESUME_NEUTRAL = frozenset({"name", "steps", "checkpoint_every", "keep_checkpoints", "preview_every",
                            "preview_sampler_steps", "log_every", "compile", "channels_last", "num_workers", "resume",
                            "gpus", "processes"})  # fmt: skip
# keys that change how a training runs, not its weights, which rule params held before they were known to: compared
# at these values (their defaults) wherever weights are compared (rule params, a checkpoint's fingerprint, resume
# check and digest), so that switching one resumes a training and a workdir made before keeps its params
NEUTRAL_AT_DEFAULT: dict[str, dict[str, Any]] = {"model": {"use_checkpoint": False}, "train": {"processes": 1}}


# train keys that only the lesion scale's training data reads (loss weights, texture groups, context): the
# whole-volume data has none of them, so editing one (for the lesion model, which inherits it) must not retrain it
LESION_ONLY_TRAIN = frozenset({"focus_weight", "focus_margin_mm", "balance_textures", "context_free_diameter_mm",
                               "context_outside_weight"})  # fmt: skip


def weight_settings(train: Mapping[str, Any], whole: bool = False) -> dict[str, Any]:
    """The ``train`` keys that shape a model's weights (``steps`` and every key not in :data:`RESUME_NEUTRAL`; those
    of :data:`NEUTRAL_AT_DEFAULT` at its value, :data:`LATER_DEFAULTS` at theirs left out): a training rule's params,
    so that a change of how it runs (``num_workers``, ``compile``, ``gpus``, ...) neither reruns it nor, by
    rewriting its checkpoint, everything sampled with it. Of the ``whole``-volume model, the
    :data:`LESION_ONLY_TRAIN` keys, and ``cond_dropout`` without ``flip`` or ``crop`` (its nodules are all "any
    texture" already; its draw shifts only those of the flips and crops), are held at their defaults."""
    held = NEUTRAL_AT_DEFAULT["train"]
    kept = {k: held.get(k, v) for k, v in train.items() if k == "steps" or k not in RESUME_NEUTRAL or k in held}
    if whole:  # held at the schema's defaults, so that a workdir made before keeps its params
        defaults = schema_defaults("train")
        unread = LESION_ONLY_TRAIN | ({"cond_dropout"} if not (train.get("flip") or train.get("crop")) else set())
        kept = at_defaults(kept, unread, defaults)
    return without_later_defaults(kept)


def model_weight_settings(model: Mapping[str, Any]) -> dict[str, Any]:
    """``model`` (a config section or a checkpoint's ``unet``) with the :data:`NEUTRAL_AT_DEFAULT` model keys it has
    at their compared values."""
    held = NEUTRAL_AT_DEFAULT["model"]
    return {k: held.get(k, v) for k, v in model.items()}


# data keys that only refuse input, never shape an output: in no rule's params, so that setting one reruns nothing
# (and its arrival reran nothing)
CHECK_ONLY_DATA = {"images": ("max_air_nodule_ml",)}


SOURCE_SECTIONS = ("demo", "images")  # a source's own keys: held at their defaults where another source is read
# which demo cases exist, not what a case is: the case list (the split's ``cases`` param, each case's jobs) says it
DEMO_SELECTION = ("min_nodule_diameter_mm", "min_readers", "max_slices")


def data_settings(data: Mapping[str, Any], case: bool = False, unread: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``data`` keys that shape a rule's outputs: never where the LIDC download lies (``dicom_root``: moving it
    reruns nothing) nor the :data:`CHECK_ONLY_DATA` keys; of a ``case``-wise rule (preprocessing, ROIs, lesion
    items) not which cases there are either (``cases``, ``demo.n_scans``: a case's files are the inputs of its jobs),
    so that adding a case reruns no other case. Held at the schema's defaults, so that editing one reruns nothing
    (and a workdir made before keeps its params): the section of the source not read (:data:`SOURCE_SECTIONS`), the
    demo's :data:`DEMO_SELECTION` keys, and ``unread`` (top-level keys the rule does not read)."""
    defaults = schema_defaults("data")
    drop = ("cases", "dicom_root") if case else ("dicom_root",)
    other_source = [section for section in SOURCE_SECTIONS if section != data.get("source")]
    out = at_defaults({k: v for k, v in data.items() if k not in drop}, [*unread, *other_source], defaults)
    if isinstance(out.get("demo"), Mapping):
        demo = {k: v for k, v in out["demo"].items() if not (case and k == "n_scans")}
        out["demo"] = at_defaults(demo, DEMO_SELECTION, defaults["demo"])
    for section, keys in CHECK_ONLY_DATA.items():
        if isinstance(out.get(section), Mapping):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


# keys added after workdirs existed, at the value that does what was done before the key (the schema's default)
LATER_DEFAULTS: dict[str, Any] = {"timestep_spacing": "trailing", "nodule_fraction": 0.5, "ema_every": 1,
                                  "ema_start": 0, "guidance_against": "any", "preprocessing": "lungddpm"}  # fmt: skip


def unread_feature_keys(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``metrics.features`` keys that change no feature under the config's extractor, so no rule param: where it
    runs (``device``), the weight file where the extractor is not medicalnet, the seed where it is not random (each
    reran the metrics and the report)."""
    extractor = config["metrics"]["features"]["extractor"]
    unread = {"device": True, "weights": extractor != "medicalnet", "seed": extractor != "random"}
    return tuple(k for k, v in unread.items() if v)


def without_later_defaults(section: Mapping[str, Any]) -> dict[str, Any]:
    """``section`` without the :data:`LATER_DEFAULTS` keys that hold that value: what rule params and item provenance
    compare, so that such a key's arrival reruns and remakes nothing (as :func:`set_keys` for null defaults)."""
    return {k: v for k, v in section.items() if k not in LATER_DEFAULTS or LATER_DEFAULTS[k] != v}


def lesion_training_settings(lesion: Config) -> dict[str, Any]:
    """What the lesion model's training reads of :func:`lesion_config`'s merged view ``lesion``: network (less
    ``init_from``, always null there), diffusion (null keys left out), training keys, HU window and ROI grid. The
    ``train_lesion`` rule's params: a whole-volume key that ``lesion.*`` overrides (``train.steps``) or never reaches
    (``train.processes``), or one of how it runs (``train.gpus``), does not retrain it; one it inherits
    (``train.lr_warmup_steps``), or a ``lesion.*`` edit, does."""
    raw = lesion.raw
    return {
        "model": {k: v for k, v in model_weight_settings(raw["model"]).items() if k != "init_from"},
        "diffusion": set_keys(raw["diffusion"]),
        "train": weight_settings(raw["train"]),
        "intensity": raw["intensity"],
        "preprocess": {k: raw["preprocess"][k] for k in ("size", "spacing_mm")},
    }


def insert_texture(texture: str, source: str | None) -> str:
    """The texture the lesion model is asked for, for ``lesion.insert.texture`` (or the studio's) ``texture``:
    ``bank`` (each bank nodule's own class) is ``any`` where the model learns no texture class (``source`` images:
    its nodules' texture is unknown, so the nodule channel says "any texture" in training, and a class level would be
    one it never saw)."""
    return "any" if texture == "bank" and source == "images" else texture


def lesion_insert(config: Mapping[str, Any]) -> dict[str, Any]:
    """``lesion.insert`` as the lesion run uses it (its texture: :func:`insert_texture`): what the rule's params and
    the items' provenance compare, so an images workdir made before remakes its items once."""
    insert = dict(config["lesion"]["insert"])
    if "texture" in insert:
        insert["texture"] = insert_texture(insert["texture"], (config.get("data") or {}).get("source"))
    return insert


def fractional_blend(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"margin_vox": [z, y, x]}`` where ``sample.blend_margin_mm`` is no whole number of voxels of the model grid
    (``preprocess.spacing_mm``), else ``{}``: such a margin was rounded per axis until 2026-12-07
    (:func:`lungddpm.diffusion.sample.blend_radii`), so the sample rule's params and its items' provenance carry it
    there and a workdir made before samples again; on a grid that divides the margin nothing changed or reruns."""
    s = config["sample"]
    radii = [float(s["blend_margin_mm"]) / float(v) for v in config["preprocess"]["spacing_mm"]]
    whole = all(abs(r - round(r)) <= 1e-6 * max(r, 1.0) for r in radii)
    return {} if whole or not s["blend"] else {"margin_vox": [round(r, 6) for r in radii]}


def layout_edit_read(section: Mapping[str, Any]) -> dict[str, Any]:
    """The ``layout_edit`` keys the augment run reads: with ``insert: 0`` only ``insert`` and ``remove_existing``
    (the bank's filters and the placement tries shape nothing). What the sample rule's params and the augment items'
    provenance compare, an item's recorded section reduced alike: editing an unread key reruns and remakes nothing
    (it resampled the whole run)."""
    if section.get("insert", 0) > 0:
        return dict(section)
    return {k: section[k] for k in ("insert", "remove_existing") if k in section}


def augment_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """What shapes the augment run's layouts beyond the eval run's settings, as the sample rule's params and the
    augment items' provenance both compare it: the ``layout_edit`` keys it reads (:func:`layout_edit_read`) and,
    where it inserts nodules and the fraction is not the default, ``preprocess.nodule_fraction`` (the inserted
    nodules' labels: 0.5 before the key counted)."""
    edit = layout_edit_read(config["layout_edit"])
    fraction = without_later_defaults({"nodule_fraction": config["preprocess"]["nodule_fraction"]})
    return {"layout_edit": edit, **(fraction if edit["insert"] > 0 else {})}
