"""Load and validate the workflow config against ``config/schema.yaml``; typed views of its sections."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .config_checks import consistency_problems, lesion_scale_runs
from .errors import ConfigError

SCHEMA_FILE = "schema.yaml"


def _schema_path() -> Path:
    """The schema lives in the repository's config/; an installed wheel carries a copy as package data."""
    repo = Path(__file__).resolve().parents[1] / "config" / SCHEMA_FILE
    if repo.is_file():
        return repo
    return Path(str(resources.files("lungddpm") / SCHEMA_FILE))


def load_schema() -> dict[str, Any]:
    """The parsed schema (a fresh copy: callers may fill it in)."""
    return copy.deepcopy(_parsed_schema())


@functools.cache
def _parsed_schema() -> dict[str, Any]:
    """Parsed once per process, by libyaml where PyYAML has it: a Snakemake parse validates five times."""
    return yaml.load(_schema_path().read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _fill_defaults(instance: dict[str, Any], schema: Mapping[str, Any]) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(instance[key], sub)


def _coerce(instance: Any, schema: Mapping[str, Any]) -> Any:
    """Turn strings into the numbers/booleans the schema expects (``snakemake --config 'preprocess={size: [64,
    64, 64]}'`` parses nested values as strings); anything else is left for validation to report."""
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in instance:
                instance[key] = _coerce(instance[key], sub)
        return instance
    if isinstance(instance, list) and "items" in schema:
        return [_coerce(v, schema["items"]) for v in instance]
    if isinstance(instance, float) and "integer" in types and "number" not in types and instance.is_integer():
        return int(instance)  # 16.0 from a script's YAML passes the schema as an integer, then breaks torch
    if isinstance(instance, str) and "string" in types and "null" in types and instance.strip() in ("null", "~"):
        return None  # snakemake --config 'data={images: {label_dir: null}}' delivers the text "null"
    if isinstance(instance, str) and "string" not in types:
        text = instance.strip()
        if "enum" in schema and instance not in schema["enum"]:  # segmentation.folds: [0, 1] -> ints, all stays
            return next((v for v in schema["enum"] if str(v) == text), instance)
        if "boolean" in types and text in ("true", "True", "false", "False"):
            return text in ("true", "True")
        if "null" in types and text in ("null", "None", "~", ""):
            return None
        for kind, cast in (("integer", int), ("integer", float), ("number", float)):  # '24.0': a whole float's text
            if kind in types:
                try:
                    return _coerce(cast(text), schema)  # 24.0 -> 24 where an integer is asked, as from a file
                except ValueError:
                    pass
    return instance


def _errors(instance: Any, schema: Mapping[str, Any]) -> Iterator[str]:
    validator = jsonschema.Draft202012Validator(schema)
    for err in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            yield f"{where}: {err.message}; allowed keys here: {allowed}"
        else:
            yield f"{where}: {err.message}"


def _override_problems(config: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """``lesion.model`` / ``lesion.diffusion`` / ``lesion.train``: each key they override, coerced and checked
    against its own section's schema (no defaults filled: they are partial), so that a mistyped value is named
    there before any check computes with it."""
    lesion = config.get("lesion") if isinstance(config.get("lesion"), dict) else {}
    out = []
    for section in ("model", "diffusion", "train"):
        given = lesion.get(section)
        if not isinstance(given, dict):  # else the schema's problem
            continue
        partial = {k: v for k, v in schema["properties"][section].items() if k not in ("default", "required")}
        _coerce(given, partial)
        where = f"lesion.{section}"
        out += [f"{where}{p.removeprefix('<top level>')}" if p.startswith("<top level>") else f"{where}.{p}"
                for p in _errors(given, partial)]  # fmt: skip
    return out


def validate_config(config: dict[str, Any], source: str = "config", scale: str = "volume") -> dict[str, Any]:
    """Validate ``config`` in place (defaults filled) and return it; raise :class:`ConfigError` listing every
    offending key and how to fix it. ``scale``: ``lesion`` for :func:`lesion_config`'s merged view."""
    schema = load_schema()
    _coerce(config, schema)
    _fill_defaults(config, schema)
    problems = list(_errors(config, schema))
    if not problems and scale == "volume":
        problems += _override_problems(config, schema)
    if not problems and (scale == "volume" or lesion_scale_runs(config)):  # a lesion scale that never runs: not
        problems += consistency_problems(config, scale)  # checked (its network may not fit the whole-volume grid)
    if problems:
        raise ConfigError(f"{source}: invalid configuration (see config/schema.yaml):\n  " + "\n  ".join(problems))
    return config


def canonical(value: Any, reference: Any) -> Any:
    """``value`` with every mapping's keys in ``reference``'s order (keys it lacks after them, sorted), recursively;
    list items against the reference's item at their index (else its first); a number as an int or a float as the
    reference has it (where that keeps its value). Snakemake compares a rule's params by their ``repr``, so without
    this a config file with the same values in another key order, or ``-400.0`` for ``-400``, reruns every job."""
    if isinstance(value, Mapping):
        ref = reference if isinstance(reference, Mapping) else {}
        keys = [k for k in ref if k in value] + sorted((k for k in value if k not in ref), key=str)
        return {k: canonical(value[k], ref.get(k)) for k in keys}
    if isinstance(value, list):
        ref = reference if isinstance(reference, list) else []
        return [canonical(v, ref[i] if i < len(ref) else (ref[0] if ref else None)) for i, v in enumerate(value)]
    if _is_number(value) and _is_number(reference):  # -400 and -400.0 are one value: written as the reference is
        if isinstance(reference, int) and float(value).is_integer():
            return int(value)
        if isinstance(reference, float) and float(value) == value:
            return float(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def key_order_reference(path: str | Path, fallback: dict[str, Any]) -> dict[str, Any]:
    """The shipped config at ``path`` with the schema's defaults filled, not validated (it is only the key order
    for :func:`canonical`; the workflow validates the merged config); ``fallback`` when it cannot be read."""
    try:
        ref = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return fallback
    if not isinstance(ref, dict):
        return fallback
    _fill_defaults(ref, load_schema())
    return ref


def _read_yaml(p: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{p.resolve()}: config file not found; run lungddpm in the workflow's folder (the clone, holding "
            "config/config.yaml), or give --configfile (lungddpm app: --workdir)"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a folder, unreadable, or not text
        raise ConfigError(f"{p}: not a readable YAML text file ({exc}); give the config file's path") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (data, preprocess, ...)")
    return raw


def set_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``a.b=value`` pairs (YAML-parsed values) -> nested dict; mappings merge key by key and a later value replaces
    an earlier one, as Snakemake merges ``--config``."""
    from snakemake.utils import update_config

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.source=lidc")
        try:
            nested: Any = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            why = getattr(exc, "problem", None) or exc
            raise ConfigError(
                f"--set {item!r}: the value is not YAML ({why}); e.g. --set preprocess.size=[64,64,64]"
            ) from exc
        for part in reversed(key.split(".")):
            nested = {part: nested}
        update_config(out, nested)
    return out


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None, base: str | Path | None = None) -> Config:
    """Read a YAML config (merged over ``base`` when given, as Snakemake merges a ``--configfile`` over the
    Snakefile's ``configfile:``), apply ``overrides`` (nested dict), validate, and return its typed view."""
    raw = _read_yaml(Path(base)) if base is not None else {}
    _merge(raw, _read_yaml(Path(path)))
    _merge(raw, overrides or {})
    source = str(path) if base is None else f"{path} merged over {base}"
    source += " with the command line's --set values" if overrides else ""
    return Config.from_dict(validate_config(raw, source=source))


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """``extra`` into ``base`` as Snakemake's ``update_config``: mappings merged key by key, the rest replaced."""
    for key, value in extra.items():
        if isinstance(value, Mapping):
            base[key] = base[key] if isinstance(base.get(key), dict) else {}
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


@dataclass(frozen=True)
class DemoConfig:
    n_scans: int
    min_nodule_diameter_mm: float
    min_readers: int
    max_slices: int
    seed: int
    noise_hu: float


@dataclass(frozen=True)
class ImagesConfig:
    ct_dir: str | None
    label_dir: str | None
    label_convention: str
    patient_regex: str | None
    max_air_nodule_ml: float


@dataclass(frozen=True)
class DataConfig:
    source: str
    dicom_root: str | None
    cases: tuple[str, ...]
    consensus_level: float
    min_readers: int
    demo: DemoConfig
    images: ImagesConfig


@dataclass(frozen=True)
class PreprocessConfig:
    padding_hu: float
    max_hu: float
    fine_spacing_mm: float
    spacing_mm: tuple[float, float, float]
    size: tuple[int, int, int]
    nodule_fraction: float


@dataclass(frozen=True)
class LungmaskConfig:
    threshold_hu: float
    airway_threshold_hu: float
    airway_max_diameter_mm: float
    closing_mm: float
    pleural_max_diameter_mm: float
    min_lung_ml: float
    min_component_fraction: float
    midline_hole_max_mm: float


@dataclass(frozen=True)
class LayoutConfig:
    min_lung_ml: float
    max_lung_ml: float
    min_side_fraction: float


@dataclass(frozen=True)
class SplitConfig:
    train: float
    val: float
    test: float
    seed: int


@dataclass(frozen=True)
class IntensityConfig:
    hu_window: tuple[float, float]


@dataclass(frozen=True)
class TrainConfig:
    name: str
    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    lr_warmup_steps: int
    weight_decay: float
    ema_decay: float
    ema_warmup: bool
    grad_clip: float
    checkpoint_every: int
    keep_checkpoints: int
    preview_every: int
    preview_sampler_steps: int
    log_every: int
    seed: int
    precision: str
    compile: bool
    channels_last: bool
    num_workers: int
    resume: str
    processes: int
    gpus: int
    focus_weight: float = 0.0
    focus_margin_mm: float = 3.0
    cond_dropout: float = 0.0
    flip: bool = False
    balance_textures: bool = False
    context_free_diameter_mm: tuple[float, float] = (5.0, 15.0)
    context_outside_weight: float = 1.0
    crop: int = 0
    ema_every: int = 1
    ema_start: int = 0


@dataclass(frozen=True)
class Config:
    data: DataConfig
    preprocess: PreprocessConfig
    lungmask: LungmaskConfig
    layout: LayoutConfig
    split: SplitConfig
    intensity: IntensityConfig
    model: dict[str, Any]  # see lungddpm.diffusion.unet.unet_config_from_dict
    diffusion: dict[str, Any]  # see lungddpm.diffusion.process.DiffusionConfig
    train: TrainConfig
    raw: dict[str, Any]  # the validated mapping itself (checkpoints store it)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> Config:
        """Typed view of an already validated config dict."""
        d = dict(cfg["data"])
        d["demo"] = DemoConfig(**d["demo"])
        d["images"] = ImagesConfig(**d["images"])
        d["cases"] = tuple(d["cases"])
        p = dict(cfg["preprocess"])
        p["spacing_mm"] = tuple(float(v) for v in p["spacing_mm"])
        p["size"] = tuple(int(v) for v in p["size"])
        return cls(
            data=DataConfig(**d),
            preprocess=PreprocessConfig(**p),
            lungmask=LungmaskConfig(**cfg["lungmask"]),
            layout=LayoutConfig(**cfg["layout"]),
            split=SplitConfig(**cfg["split"]),
            intensity=IntensityConfig(hu_window=tuple(float(v) for v in cfg["intensity"]["hu_window"])),
            model=dict(cfg["model"]),
            diffusion=dict(cfg["diffusion"]),
            train=TrainConfig(**cfg["train"]),
            raw=copy.deepcopy(dict(cfg)),
        )


def config_from_mapping(cfg: Mapping[str, Any]) -> Config:
    """Validate a plain mapping (e.g. Snakemake's ``config``) and return its typed view."""
    return Config.from_dict(validate_config(copy.deepcopy(dict(cfg))))


def lesion_config(cfg: Config) -> Config:
    """The lesion scale's view of ``cfg`` (DESIGN §5): the same sections with ``lesion.model``,
    ``lesion.diffusion`` and ``lesion.train`` merged over ``model``, ``diffusion`` and ``train``, and the model grid
    replaced by the ROI grid, so that the one trainer, network and samplers serve both scales. Validated like the
    whole config."""
    raw = copy.deepcopy(cfg.raw)
    lesion = raw["lesion"]
    raw["model"] = {**raw["model"], **lesion["model"], "init_from": None}
    raw["diffusion"] = {**raw["diffusion"], **lesion["diffusion"]}
    # one process on at most one GPU: the whole-volume model's DDP is not the lesion model's (lesion.train.gpus: 0
    # keeps it off a GPU that train.gpus requests)
    raw["train"] = {k: v for k, v in raw["train"].items() if k != "processes"}
    raw["train"]["gpus"] = min(int(raw["train"]["gpus"]), 1)
    _merge(raw["train"], lesion["train"])
    n, s = int(lesion["roi"]["size"]), float(lesion["roi"]["spacing_mm"])
    raw["preprocess"] = {**raw["preprocess"], "size": [n, n, n], "spacing_mm": [s, s, s]}
    try:
        source = "lesion scale (lesion.model / lesion.diffusion / lesion.train)"
        return Config.from_dict(validate_config(raw, source=source, scale="lesion"))
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}\n  (model.*, diffusion.* and train.* above are lesion.model.*, lesion.diffusion.* and "
            "lesion.train.* merged over them)"
        ) from exc
