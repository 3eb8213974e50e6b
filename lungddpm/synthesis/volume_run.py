"""Bulk synthetic datasets: layouts x k samples, sharded into independent jobs, with provenance.

Two runs never mix (DESIGN §1): ``eval`` samples the *test* layouts (their real CTs are the references and the
pairs for the image-quality metrics); ``augment`` samples *train* layouts edited with new nodules from the bank
(for the downstream segmentation arms only). Per item ``<case>_<k>``: ``.nii.gz`` (int16 HU, the case's true
affine), ``_layout.nii.gz`` (the segmentation label), ``.gif`` (axial sweep), ``_montage.png`` (real | layout |
synthetic) and, written last, ``.json`` provenance. Rerunning skips items whose provenance exists, matches the
current checkpoint and settings, and whose files are all present.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..atomic import atomic_path, remove_stale_temps
from ..config import Config
from ..diffusion.checkpoint import check_sampling_grid, load_for_sampling, model_digest
from ..diffusion.convention import convention_from_checkpoint
from ..diffusion.precision import precision_name, resolve_precision
from ..diffusion.process import DiffusionConfig, GaussianDiffusion
from ..diffusion.sample import Blend, blend_radii, keep_mask, sample
from ..errors import LayoutError, LungDDPMError, SamplingError
from ..io import file_sha256, files_sha256, read_header, read_json, safe_component, write_json, write_volume
from ..preprocessing.layout import read_case_pair
from ..settings import LATER_DEFAULTS, augment_settings, fractional_blend, layout_edit_read, without_later_defaults
from ..versions import output_version
from .plan import Item, sampling_what

log = logging.getLogger(__name__)


def item_files(out_dir: Path, item: Item) -> dict[str, Path]:
    """The files of one item in ``out_dir``; an item name that is not a plain file name is refused."""
    base = out_dir / safe_component(item.name, "synthetic item")
    return {
        "image": base.with_name(f"{item.name}.nii.gz"),
        "layout": base.with_name(f"{item.name}_layout.nii.gz"),
        "gif": base.with_name(f"{item.name}.gif"),
        "montage": base.with_name(f"{item.name}_montage.png"),
        "provenance": base.with_name(f"{item.name}.json"),
    }


def gif_sweep(path: Path, volume_hu: np.ndarray, window: tuple[float, float] = (-1350.0, 150.0)) -> None:
    """Axial sweep (one frame per slice, superior first) in a lung window."""
    from PIL import Image

    lo, hi = window
    frames = np.clip((volume_hu[::-1] - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
    scale = max(1, 192 // max(frames.shape[1:]))
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=80, loop=0)


def _settings(cfg: Config, run: str, ckpt_sha: str, bank_sha: str | None) -> dict[str, Any]:
    """What every item of a run depends on besides its own seed and inputs (a rerun redoes items that disagree)."""
    s = {**cfg.raw["sample"], **sampling_what(cfg.raw["sample"])}  # the blend's shape held where none is made
    settings = {
        "model_sha256": ckpt_sha,
        "precision": s["precision"],
        "sampler": s["sampler"],
        "steps": s["steps"],
        "use_ema": s["use_ema"],
        "clip_x0": s["clip_x0"],
        "blend": {
            "enabled": s["blend"],
            "margin_mm": s["blend_margin_mm"],
            "start_fraction": s["blend_start_fraction"],
            **fractional_blend(cfg.raw),
        },
        "timestep_spacing": s["timestep_spacing"],
    }
    settings = without_later_defaults(settings)  # the default, as before the key: old items stay complete
    settings.update(output_version("sample"))  # a bump remakes items made by older code
    if run == "augment":
        settings.update(augment_settings(cfg.raw))
    if bank_sha is not None:
        settings["bank_sha256"] = bank_sha
    return settings


def item_settings(settings: dict[str, Any], item: Item, inputs_sha256: str) -> dict[str, Any]:
    """A run's ``settings`` with what is an item's own (its seed and the digest of its inputs): what its provenance
    records and a rerun compares."""
    return {**settings, "seed": item.seed, "inputs_sha256": inputs_sha256}


def provenance_complete(files: dict[str, Path], settings: dict[str, Any]) -> bool:
    """All ``files`` exist and the provenance (``files['provenance']``, written last) agrees with ``settings``; a
    :data:`~lungddpm.settings.LATER_DEFAULTS` key that ``settings`` leaves out (it holds the default) must be absent
    from the provenance or hold the default too."""
    if not files["provenance"].is_file() or not all(p.is_file() for p in files.values()):
        return False
    try:
        prov = read_json(files["provenance"])
    except Exception:
        return False
    if isinstance(prov.get("layout_edit"), dict):  # an item made before the unread keys were left out
        prov["layout_edit"] = layout_edit_read(prov["layout_edit"])
    return all(prov.get(k) == v for k, v in settings.items()) and all(
        prov.get(k, d) == d for k, d in LATER_DEFAULTS.items() if k not in settings
    )


def _entry(item: Item, files: dict[str, Path]) -> dict[str, Any]:
    return {"item": item.name, "case_id": item.case_id, "k": item.k, **{k: str(p) for k, p in files.items()}}


def synthesize_shard(
    run: str,
    items: Sequence[Item],
    cfg: Config,
    checkpoint: Path,
    ct_paths: dict[str, Path],
    layout_paths: dict[str, Path],
    out_dir: Path,
    bank_path: Path | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Sample ``items`` of ``run`` into ``out_dir``; returns one manifest entry per item (skipped or made), in the
    order of ``items`` whatever was skipped (the manifest, and what reads it, never depends on a run's history)."""
    from tqdm import tqdm

    from ..viz import three_plane_png
    from .layout_edit import insert_nodules, load_bank, remove_nodules

    sc = cfg.raw["sample"]
    if not items:  # more shards than items: nothing to load the model for
        log.warning("this shard has no items: sample.shards (%d) is above the %s run's item count; lower it to use "
                    "fewer jobs", sc["shards"], run)  # fmt: skip
        return []
    if threads:
        torch.set_num_threads(threads)
    model, ckpt, device = load_for_sampling(checkpoint, sc["use_ema"], sc["compile"])  # compile: docs/speed.md
    dtype = resolve_precision(sc["precision"], device)
    diffusion = GaussianDiffusion(DiffusionConfig(**ckpt["diffusion"]))
    convention = convention_from_checkpoint(ckpt, checkpoint)  # how this model sees a case (HU window or Lung-DDPM's)
    edit = cfg.raw["layout_edit"]
    fraction = float(cfg.raw["preprocess"]["nodule_fraction"])  # inserted nodules labelled as the real ones
    bank = candidates = None
    if run == "augment" and edit["insert"] > 0:
        if bank_path is None:
            raise LayoutError("the augment run inserts nodules but no nodule bank was given; run the nodule_bank rule")
        bank = load_bank(bank_path)
        candidates = bank.matching(edit, "layout_edit", str(bank_path))
    settings = _settings(cfg, run, model_digest(ckpt), file_sha256(bank_path) if bank is not None else None)
    settings["precision_used"] = precision_name(dtype)  # what auto became here: a resume elsewhere remakes, not mixes
    inputs: dict[str, str] = {}  # per case: the digest of its CT and layout, so that new inputs are sampled anew
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}  # item name -> manifest entry
    pending: list[tuple[Item, dict[str, Path]]] = []
    for item in items:
        files = item_files(out_dir, item)
        if item.case_id not in inputs:  # once per case: its k items read the same files
            inputs[item.case_id] = files_sha256([ct_paths[item.case_id], layout_paths[item.case_id]])
        if provenance_complete(files, item_settings(settings, item, inputs[item.case_id])):
            log.info("%s: complete, skipped", item.name)
            entries[item.name] = {**_entry(item, files), "skipped": True}
        else:
            for path in files.values():  # a killed earlier run may have left hidden temporaries: never reused
                for stale in remove_stale_temps(path):
                    log.info("%s: removed %s left by an interrupted write", item.name, stale.name)
            pending.append((item, files))
    for case_id in dict.fromkeys(item.case_id for item, _ in pending):  # each case once, before any sampling
        shape, geometry = read_header(layout_paths[case_id])
        check_sampling_grid(ckpt, shape, geometry.spacing, checkpoint, layout_paths[case_id])
    batch_size = int(sc["batch_size"])
    bar = tqdm(total=len(pending), desc=f"sample {run}", unit="volume", mininterval=5.0)
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        t0 = time.perf_counter()
        prepared = []
        for item, _ in chunk:
            ct, layout, geometry = read_case_pair(ct_paths[item.case_id], layout_paths[item.case_id])
            edits: list[dict[str, Any]] = []
            if run == "augment":
                rng = np.random.default_rng(item.seed)
                if edit["remove_existing"]:
                    layout, removed = remove_nodules(layout, geometry)
                    edits += removed
                if edit["insert"] > 0:
                    try:
                        layout, inserted = insert_nodules(layout, geometry, candidates, edit["insert"], rng,
                                                          edit["max_attempts"], fraction=fraction)  # fmt: skip
                    except LayoutError as exc:
                        raise LayoutError(
                            f"{layout_paths[item.case_id]} (item {item.name}): {exc}; lower layout_edit.insert or "
                            "layout_edit.diameter_mm, or raise layout_edit.max_attempts"
                        ) from exc
                    edits += inserted
            margin = blend_radii(sc["blend_margin_mm"], geometry.spacing)
            keep = keep_mask(layout, margin) if sc["blend"] else np.zeros(layout.shape, bool)
            prepared.append((ct, layout, geometry, edits, keep, convention.to_model(ct, layout, keep)))
        shapes = {p[5].image.shape[1:] for p in prepared}
        if len(shapes) > 1:
            raise LayoutError(f"cases of one batch have different grids {sorted(shapes)}; set sample.batch_size: 1")
        blend = None
        if sc["blend"]:
            blend = Blend(
                torch.from_numpy(np.stack([p[5].image for p in prepared])),
                torch.from_numpy(np.stack([p[5].keep for p in prepared])),
                sc["blend_start_fraction"],
            )
        layout_t = torch.from_numpy(np.stack([p[5].layout for p in prepared])).to(device)
        generators = [torch.Generator().manual_seed(item.seed) for item, _ in chunk]
        try:
            x = sample(model, diffusion, layout_t, sc["sampler"], sc["steps"], generators, blend=blend,
                       autocast_dtype=dtype, clip_x0=sc["clip_x0"],
                       timestep_spacing=sc["timestep_spacing"])  # fmt: skip
        except SamplingError as exc:
            names = ", ".join(item.name for item, _ in chunk)
            raise SamplingError(f"{checkpoint}: items {names}: {exc} (sample.precision: fp32)") from exc
        seconds = (time.perf_counter() - t0) / len(chunk)
        for b, ((item, files), (ct, layout, geometry, edits, keep, inp)) in enumerate(zip(chunk, prepared)):
            hu = convention.to_hu(x[b, 0].float().cpu().numpy(), inp)  # HU on the case's grid
            hu = np.where(keep, ct, np.round(hu)).astype(np.int16)  # the reference's exact HU where it was kept
            files["provenance"].unlink(missing_ok=True)  # an item killed while rewritten is incomplete, not the old one
            write_volume(files["image"], hu, geometry)
            write_volume(files["layout"], layout, geometry)
            gif_sweep(files["gif"], hu.astype(np.float32))
            three_plane_png(
                files["montage"],
                [
                    ("real", ct.astype(np.float32), "hu"),
                    ("layout", layout, "layout"),
                    ("synthetic", hu.astype(np.float32), "hu"),
                ],
                spacing=geometry.spacing,
            )
            write_json(
                files["provenance"],
                {
                    "item": item.name,
                    "run": run,
                    "source_case": item.case_id,
                    "k": item.k,
                    **item_settings(settings, item, inputs[item.case_id]),
                    "checkpoint": str(checkpoint),
                    "edits": edits,
                    "keep_voxels": int(keep.sum()),
                    "geometry": geometry.to_json(),
                    **inp.record,  # the intensity mapping: hu_window, or Lung-DDPM's per-column min/max
                    "device": str(device),
                    "batch_size": len(chunk),
                    "seconds": round(seconds, 2),
                    "lungddpm_version": __version__,
                },
            )
            log.info(
                "%s: %s %d steps, %.1f s per volume, %d edit(s)",
                item.name,
                sc["sampler"],
                sc["steps"],
                seconds,
                len(edits),
            )
            entries[item.name] = {**_entry(item, files), "skipped": False, "seconds": round(seconds, 2)}
        bar.update(len(chunk))
    bar.close()
    return [entries[item.name] for item in items]


def sample_shard_entry(cfg: Config, run: str, shard_index: int, shards: int | None, results: Path,
                       bank: Path | None, threads: int) -> Path:  # fmt: skip
    """``lungddpm sample``: shard ``shard_index`` of ``shards`` (default ``sample.shards``) of ``run`` from the
    workflow's ``results``; returns its manifest. Another sharding than ``sample.shards`` writes
    ``shard_<i>_of_<n>.json``, never over the workflow's manifests (which would then list items twice)."""
    from ..io import write_json
    from ..preprocessing.cases import case_ct, case_layout, case_split, list_cases, model_checkpoint, run_cases
    from .plan import items_of_run, shard

    sc = cfg.raw["sample"]
    n = sc["shards"] if shards is None else shards
    if not 0 <= shard_index < n:
        raise LungDDPMError(f"--shard {shard_index}: not a shard of --shards {n}; choose 0 to {n - 1}")
    cases = run_cases(case_split(cfg, list_cases(cfg)), run)
    items = shard(items_of_run(cfg.raw, run, cases), n, shard_index)
    out = results / "synthetic" / run
    cts, layouts = {c: case_ct(results, c) for c in cases}, {c: case_layout(results, c) for c in cases}
    manifest = synthesize_shard(run, items, cfg, model_checkpoint(cfg, results), cts, layouts, out, bank, threads)
    path = out / (f"shard_{shard_index}.json" if n == sc["shards"] else f"shard_{shard_index}_of_{n}.json")
    write_json(path, {"run": run, "items": manifest})
    return path
