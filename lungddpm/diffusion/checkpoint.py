"""Checkpoints: the one place that loads model files (sampling and synthesis never import the trainer), and the
trainer's resumable step checkpoints (fingerprint, newest complete one, atomic save)."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path
from ..config import Config
from ..errors import LungDDPMError
from ..io import zip_damage
from ..settings import LATER_DEFAULTS, model_weight_settings, set_keys, weight_settings
from ..versions import output_version
from .device import pick_device
from .unet import LUNG_DDPM_TIME_MAX_PERIOD, UNet3D, UNetConfig

log = logging.getLogger(__name__)

CKPT_KEYS = {"model", "ema", "optimizer", "scaler", "step", "rng_cpu", "rng_cuda", "fingerprint", "config", "version"}


DAMAGED_PICKLE = ("Unsupported operand", "Only persistent_load of storage", "String is too long")  # torch's words


class CheckpointError(LungDDPMError):
    """A checkpoint that cannot or must not be used."""


class UnreadableCheckpointError(CheckpointError):
    """A file that torch cannot read at all: truncated, damaged or another kind of file."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of an archive whose members all pass their CRC-32 (a damaged file is
    :class:`UnreadableCheckpointError`); a file that needs arbitrary unpickling is refused, not trusted."""
    if path.is_file() and (damage := zip_damage(path)) is not None:
        raise UnreadableCheckpointError(
            f"{path}: not a readable torch checkpoint — {damage}, so the file is damaged (a bad copy, disk or "
            "transfer); copy or download it again and compare its SHA-256 with the source's, or, for one trained "
            "here, delete it and rerun the rule that wrote it"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if any(mark in str(exc) for mark in DAMAGED_PICKLE):  # bytes no pickle writes: damaged, not unsafe
            raise UnreadableCheckpointError(
                f"{path}: not a readable torch checkpoint — its pickle is damaged ({_last_line(exc)}); copy or "
                "download it again and compare its SHA-256 with the source's"
            ) from exc
        raise CheckpointError(
            f"{path}: refused — it cannot be loaded with torch.load(weights_only=True) because it contains "
            "arbitrary Python objects, which could run code; re-save it as plain state dicts (tensors, numbers, "
            f"strings); a damaged file can read so too: compare its SHA-256 with the source's ({_last_line(exc)})"
        ) from exc
    except FileNotFoundError as exc:
        raise UnreadableCheckpointError(f"{path}: no such checkpoint file; check the path") from exc
    except (RuntimeError, KeyError, IndexError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise UnreadableCheckpointError(
            f"{path}: not a readable torch checkpoint — truncated, damaged or another kind of file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); copy or download it again and "
            "compare its SHA-256 with the source's"
        ) from exc


def _last_line(exc: BaseException) -> str:
    """The line of torch's long weights-only message that says what failed."""
    lines = [ln.strip() for ln in str(exc).splitlines() if "Unpickler error" in ln or "Unsupported" in ln]
    return lines[-1] if lines else str(exc).splitlines()[0]


def model_digest(ckpt: dict[str, Any]) -> str:
    """sha256 of a loaded model checkpoint's content by value: what a sampled item's provenance compares. Its tensors
    and settings (the network's with :data:`~lungddpm.settings.NEUTRAL_AT_DEFAULT` keys held), not ``version`` or
    ``global_batch`` and, of the training's whole ``config``, only what sampling reads (the lesion model's
    ``texture_hu`` and ``roi``): an edit elsewhere in the config does not change the model. The file's own
    bytes differ each time torch.save writes the same content (a serialization id), so a training rerun that hands
    back the same weights would otherwise remake every item; nor does an import's source path (the same file
    imported from another folder is the same model)."""
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if torch.is_tensor(obj):
            h.update(f"tensor {obj.dtype} {tuple(obj.shape)}".encode())
            h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                h.update(f"key {key!r}".encode())
                feed(obj[key])
        elif isinstance(obj, list | tuple):
            h.update(f"sequence {len(obj)}".encode())
            for item in obj:
                feed(item)
        else:
            h.update(json.dumps(obj, sort_keys=True, default=repr).encode())

    lesion = (ckpt.get("config") or {}).get("lesion") or {}
    read = {k: lesion[k] for k in ("texture_hu", "roi") if k in lesion}
    unet = {"unet": model_weight_settings(ckpt["unet"])} if isinstance(ckpt.get("unet"), dict) else {}
    kept = {k: v for k, v in ckpt.items() if k not in ("version", "config", "global_batch")}
    if isinstance(ckpt.get("source"), dict):  # an import: the file's sha256, not where it lay
        kept["source"] = {k: v for k, v in ckpt["source"].items() if k != "file"}
    feed({**kept, **unet, "config": read})
    return h.hexdigest()


def model_sha256(path: Path) -> str:
    """:func:`model_digest` of the checkpoint file at ``path`` (a caller that has loaded it passes the dict)."""
    return model_digest(load_checkpoint(Path(path)))


LUNG_DDPM_PREFIX = "denoise_fn."  # the original trainer's GaussianDiffusion holds its UNet as ``denoise_fn``


def _is_lung_ddpm(ckpt: dict[str, Any]) -> bool:
    """Whether ``ckpt`` is the original's trainer dict (its ``ema`` / ``model`` state dicts) or a bare state dict."""
    states = [ckpt] + [ckpt[k] for k in ("ema", "model") if isinstance(ckpt.get(k), dict)]
    return any(str(key).startswith(LUNG_DDPM_PREFIX) for state in states for key in state)


def load_model(checkpoint: Path, use_ema: bool = True) -> tuple[UNet3D, dict[str, Any]]:
    """A trained (or imported) network from a final ``checkpoint.pt`` (EMA weights by default), in eval mode; its
    input convention is :func:`lungddpm.diffusion.convention.convention_from_checkpoint` of the returned dict."""
    ckpt = load_checkpoint(Path(checkpoint))
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{checkpoint}: not a lungddpm model checkpoint (it holds a {type(ckpt).__name__}, not a dict); give the "
            "checkpoint.pt that the train stage writes"
        )
    missing = {"ema", "model", "unet", "diffusion"} - set(ckpt)
    if "hu_window" not in ckpt and "convention" not in ckpt:
        missing.add("hu_window")
    if missing and _is_lung_ddpm(ckpt):
        raise CheckpointError(
            f"{checkpoint}: a Lung-DDPM checkpoint (its weights are named '{LUNG_DDPM_PREFIX}*'), not a lungddpm one; "
            "import it: set model.init_from to this file (rule import_checkpoint), or run `lungddpm import-lungddpm "
            f"{checkpoint} --out <checkpoint.pt>` and give that file"
        )
    if missing:
        raise CheckpointError(
            f"{checkpoint}: not a lungddpm model checkpoint (missing {sorted(missing)}); rerun the train stage"
        )
    unet_cfg = dict(ckpt["unet"])
    for key in ("channel_mult", "attention_resolutions"):
        unet_cfg[key] = tuple(unet_cfg[key])
    if "convention" in ckpt and "time_max_period" not in unet_cfg:  # imported before the period was recorded
        log.warning("%s: a Lung-DDPM import without its embedding period: using the original's 1000", checkpoint)
        unet_cfg["time_max_period"] = LUNG_DDPM_TIME_MAX_PERIOD
    model = UNet3D(UNetConfig(**unet_cfg))
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    return model.eval(), ckpt


def check_sampling_grid(
    ckpt: dict[str, Any], shape: tuple[int, ...], spacing: tuple[float, ...], checkpoint: Path, layout: Path
) -> None:
    """Refuse to sample ``layout`` (a ``shape`` [Z, Y, X] grid of ``spacing`` mm voxels) with a model trained at
    another spacing (it would draw anatomy at the wrong scale), and warn at another grid size (a convolutional
    network runs there, on a field of view it never saw: e.g. ``sample.checkpoint`` of another run). An imported
    Lung-DDPM model (a ``convention``) resizes every case to its own grid, so it is not checked."""
    if "convention" in ckpt:
        return
    trained = ckpt.get("spacing_mm")
    if trained is not None and not np.allclose(np.asarray(trained, float), np.asarray(spacing, float), rtol=1e-4):
        raise CheckpointError(
            f"{layout}: voxels of {[round(float(s), 4) for s in spacing]} mm, but {checkpoint} was trained on "
            f"{list(trained)} mm (preprocess.spacing_mm): it would draw anatomy at the wrong scale; sample with the "
            "preprocess settings it was trained with, or train a model on this grid (sample.checkpoint: null)"
        )
    size = ckpt.get("size")
    if size is not None and [int(n) for n in size] != [int(n) for n in shape]:
        log.warning("%s: a %s grid, but %s was trained on %s (preprocess.size): sampling a field of view the model "
                    "never saw", layout, list(shape), checkpoint, list(size))  # fmt: skip


def load_for_sampling(
    checkpoint: Path, use_ema: bool = True, compile: bool = False
) -> tuple[torch.nn.Module, dict[str, Any], torch.device]:
    """:func:`load_model`'s network on the GPU where there is one (with the backend settings of every run there),
    ``torch.compile``-d if asked (lazily: the first batch pays the compile), its checkpoint, and the device."""
    device = pick_device()
    model, ckpt = load_model(checkpoint, use_ema=use_ema)
    model = model.to(device)
    return (torch.compile(model) if compile else model), ckpt, device


FINGERPRINT_NAMES = {
    "model": "network (model.*)",
    "diffusion": "diffusion process (diffusion.*)",
    "size": "grid (preprocess.size)",
    "hu_window": "intensity.hu_window",
    "data": "training data (the train split's volumes and layouts or ROIs as loaded, with their texture levels, "
    "generated regions and loss weights, which at the lesion scale train.seed, focus_weight, focus_margin_mm, "
    "context_free_diameter_mm, context_outside_weight and lesion.insert.margin_mm shape too)",
    "version": "training code (lungddpm.versions.OUTPUT_VERSIONS)",
}


def fingerprint(cfg: Config, data: str | None = None, stage: str = "train") -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: network, process, grid, intensity mapping, the training code's
    version (``stage``'s :func:`lungddpm.versions.output_version`: ``train`` or ``train_lesion``) and, when given,
    the training data's :func:`lungddpm.diffusion.data.data_digest`. A diffusion key left at null is left out, so a
    training begun before the key existed (``snr_gamma``) still resumes; so is version 1."""
    out = {
        "model": {k: v for k, v in cfg.raw["model"].items() if k != "init_from"},  # init_from skips training
        "diffusion": set_keys(cfg.raw["diffusion"]),
        "size": list(cfg.preprocess.size),
        "hu_window": list(cfg.intensity.hu_window),
        **output_version(stage),
    }
    return out if data is None else {**out, "data": data}


def fingerprint_differences(found: dict[str, Any], expected: dict[str, Any], path: Path) -> list[str]:
    """What differs between a checkpoint's fingerprint and the expected one, in words; a checkpoint written before
    the data digest existed is not refused for lacking it (a warning says that its data cannot be checked)."""
    # the network keys that change memory, not weights (NEUTRAL_AT_DEFAULT) are held on both sides
    found, expected = ({**f, "model": model_weight_settings(f["model"])} if isinstance(f.get("model"), dict) else f
                       for f in (found, expected))  # fmt: skip
    if "data" in expected and "data" not in found:
        log.warning("%s: written before lungddpm compared the training data on resume; assuming they are the same",
                    path)  # fmt: skip
        expected = {k: v for k, v in expected.items() if k != "data"}
    out = []
    for key in sorted(set(found) | set(expected)):
        if found.get(key) != expected.get(key):
            what = FINGERPRINT_NAMES.get(key, key)
            if key == "data":
                out.append(what)
            elif key == "version":  # absent: version 1
                out.append(f"{what}: version {found.get(key, 1)} then, {expected.get(key, 1)} now")
            elif isinstance(found.get(key), dict) and isinstance(expected.get(key), dict):  # name the keys that differ
                a, b = found[key], expected[key]
                keys = [k for k in sorted({*a, *b}) if a.get(k) != b.get(k)]
                out.append(f"{what}: " + ", ".join(f"{k} {a.get(k)} then, {b.get(k)} now" for k in keys))
            else:
                out.append(f"{what}: {found.get(key)} then, {expected.get(key)} now")
    return out


def step_checkpoints(state_dir: Path) -> list[Path]:
    """The resumable ``step_XXXXXXX.pt`` checkpoints of ``state_dir``, newest first."""
    return sorted(state_dir.glob("step_*.pt"), reverse=True)


def find_resume_checkpoint(state_dir: Path, expected: dict[str, Any], keys: str = "train") -> dict[str, Any] | None:
    """The newest complete checkpoint; truncated or corrupt files are skipped (and reported), never loaded. ``keys``:
    the config section a refusal names (``lesion.train`` for the lesion model)."""
    for path in step_checkpoints(state_dir):
        try:
            ckpt = load_checkpoint(path)
        except UnreadableCheckpointError as exc:  # e.g. a write cut short: the one before it resumes
            log.warning("%s: unreadable checkpoint skipped (%s)", path, exc)
            continue
        except CheckpointError:  # unsafe to load: refused, not skipped
            raise
        except Exception as exc:
            log.warning("%s: unreadable checkpoint skipped (%s)", path, exc)
            continue
        if not isinstance(ckpt, dict) or not CKPT_KEYS <= set(ckpt):
            log.warning(
                "%s: incomplete checkpoint skipped (keys %s)",
                path,
                sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__,
            )
            continue
        changed = fingerprint_differences(ckpt["fingerprint"], expected, path)
        if changed:
            raise CheckpointError(
                f"{path}: trained with another {'; another '.join(changed)}; to train anew choose a new {keys}.name "
                f"(or set {keys}.resume: never, or delete {state_dir}); to keep that training, restore the config "
                "and the lungddpm version it was trained with"
            )
        log.info("resuming from %s (step %d)", path, ckpt["step"])
        return ckpt
    return None


def check_resume(ckpt: dict[str, Any], cfg: Config, state_dir: Path, keys: str = "train") -> None:
    """Refuse a checkpoint past ``train.steps``, or a finished training (its last step) whose result-shaping train
    settings have changed since: resuming it would hand back the old weights as if trained with the new settings.
    Changes before the last step are allowed (a deliberate change mid-run) and logged."""
    step, steps = int(ckpt["step"]), cfg.train.steps
    if step > steps:
        raise LungDDPMError(
            f"{state_dir}: the newest checkpoint is at step {step}, past {keys}.steps {steps}; raise {keys}.steps "
            f"to continue it, or set {keys}.resume: never (or delete {state_dir}) to train from scratch"
        )
    before = ckpt["config"]["train"]  # find_resume_checkpoint only returns checkpoints with a config
    # a key the checkpoint predates is compared only where its arrival kept the old behaviour (LATER_DEFAULTS)
    whole = keys == "train"  # the whole-volume model's settings: as its rule's params (weight_settings)
    was, now = weight_settings(before, whole), weight_settings(cfg.raw["train"], whole)
    value = {k: (was.get(k, LATER_DEFAULTS.get(k)), now.get(k, LATER_DEFAULTS.get(k))) for k in {*was, *now}}
    value.pop("steps", None)
    changed = sorted(k for k, (a, b) in value.items() if a != b and (k in before or k in LATER_DEFAULTS))
    if changed and step == steps:
        diff = ", ".join(f"{k} {value[k][0]} then, {value[k][1]} now" for k in changed)
        raise LungDDPMError(
            f"{state_dir}: this training finished (step {step} of {steps}) with other train settings ({diff}); to "
            f"train anew with them choose a new {keys}.name (or set {keys}.resume: never, or delete {state_dir}); "
            f"to keep the finished model, restore them; to continue it with them, raise {keys}.steps"
        )
    if changed:
        log.warning("train settings changed since the checkpoint of step %d: %s", step, ", ".join(changed))


def check_global_batch(ckpt: dict[str, Any], global_batch: int, steps: int) -> None:
    """Log a resume, before ``steps``, with another global batch than the checkpoint's (another number of GPUs or
    processes: each rank draws ``train.batch_size``); the training goes on with it. Older checkpoints have none."""
    was, step = ckpt.get("global_batch", global_batch), int(ckpt["step"])
    if was != global_batch and step < steps:
        log.warning("the global batch was %d up to step %d and is %d from now on (train.batch_size x processes x "
                    "grad_accum); to keep %d, resume on as many GPUs (processes) as before", was, step, global_batch,
                    was)  # fmt: skip


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, renamed onto ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
