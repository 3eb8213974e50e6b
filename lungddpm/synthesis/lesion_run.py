"""Sharded, resumable lesion runs: the augment items (nodules pasted into train CTs) and the texture-control check."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..atomic import remove_stale_temps
from ..config import Config
from ..data.sources import source_paths
from ..diffusion.checkpoint import model_digest
from ..diffusion.encoding import TEXTURE_CLASSES, texture_levels
from ..diffusion.precision import precision_name, resolve_precision
from ..errors import DicomError
from ..io import Geometry, file_sha256, write_csv, write_json, write_volume
from ..preprocessing.rois import SourceCT, load_source, real_nodule_rois
from ..settings import insert_texture, lesion_insert
from .layout_edit import load_bank
from .lesion import (
    Insertion,
    inpaint,
    item_files,
    item_inputs_sha256,
    load_lesion_model,
    nodule_mean_hu,
    place,
    read_sites,
    run_settings,
    site_seed,
)
from .paste import native_box, native_labels, paste_nodule
from .plan import Item
from .volume_run import item_settings, provenance_complete

log = logging.getLogger(__name__)


def _candidates(cfg: Config, bank_path: Path) -> list[Any]:
    return load_bank(bank_path).matching(cfg.raw["lesion"]["insert"], "lesion.insert", str(bank_path))


def _setup(cfg: Config, checkpoint: Path, bank_path: Path, threads: int | None) -> tuple[Any, ...]:
    """Threads, the lesion model and process, its HU window and texture levels, the filtered bank nodules and the
    loaded checkpoint."""
    if threads:
        torch.set_num_threads(threads)
    model, diffusion, ckpt, device = load_lesion_model(checkpoint, cfg.raw["lesion"])
    window = tuple(ckpt["hu_window"])
    levels = texture_levels(ckpt["config"]["lesion"]["texture_hu"], window)
    return model, diffusion, device, window, levels, _candidates(cfg, bank_path), ckpt


SLICE_DRIFT = 0.05  # of a slice: the most a slice may lie off the written regular grid (LIDC: 4 scans of 1018 more)


def native_geometry(src: SourceCT) -> Geometry:
    """The NIfTI geometry of the source series; refuses irregular slice spacing, which NIfTI cannot hold."""
    zs, g = src.grid.z_positions, src.grid
    dz = g.slice_step
    drift = np.abs(zs - (zs[0] + dz * np.arange(zs.size)))  # each slice against the regular grid the file states
    if zs.size > 1 and drift.max() > SLICE_DRIFT * dz:
        raise DicomError(
            f"{src.case_id}: slices are irregularly spaced (steps {np.diff(zs).min():.3f}..{np.diff(zs).max():.3f} "
            f"mm; a slice lies {drift.max():.2f} mm off a regular {dz:g} mm grid), which a NIfTI file cannot "
            "represent exactly, so the pasted CT would not overlay the source; drop "
            "this case from the lesion run (data.cases) or re-export the series with regular spacing"
        )
    return g.geometry()


def _write_item(
    item: Item, src: SourceCT, ins: list[Insertion], after: list[np.ndarray], files: dict[str, Path], cfg: Config
) -> list[dict[str, Any]]:
    """Paste every site of ``item`` into its source CT and write the item's files (provenance is the caller's)."""
    from ..viz import three_plane_png
    from .volume_run import gif_sweep

    geometry = native_geometry(src)  # refuses irregular slices before any of the item's files is written
    feather = float(cfg.raw["lesion"]["insert"]["feather_mm"])
    fraction = float(cfg.raw["preprocess"]["nodule_fraction"])
    ct = np.empty(src.hu.shape, np.int16)  # rounded, as the ROIs and every other HU volume (no float32 copy)
    np.rint(src.hu, out=ct, casting="unsafe")
    labels = native_labels(ct.shape, src.grid, src.lung_fine, src.fine, src.nodules)
    files["provenance"].unlink(missing_ok=True)  # an item killed while rewritten is incomplete, not the old one
    records = []
    for j, (c, roi_after) in enumerate(zip(ins, after)):
        n = c.site.ct.shape[0]
        box = native_box(src.grid, ct.shape, c.site.geometry, n)
        if box is None:
            raise RuntimeError(f"{item.name}: site {c.site.name} lies outside its scan")  # rois never writes one
        changed = paste_nodule(ct, labels, box, src.grid, c.site.geometry, c.nodule, c.generated, roi_after, feather,
                               fraction)  # fmt: skip
        write_volume(files[f"s{j}_before"], c.site.ct, c.site.geometry)
        write_volume(files[f"s{j}_after"], roi_after, c.site.geometry)
        write_volume(files[f"s{j}_layout"], c.layout, c.site.geometry)
        panels = [
            ("before", c.site.ct.astype(np.float32), "hu"),
            ("after", roi_after.astype(np.float32), "hu"),
            ("layout", c.layout, "layout"),
        ]
        three_plane_png(files[f"s{j}_montage"], panels, spacing=c.site.geometry.spacing)
        mean_hu = nodule_mean_hu(roi_after, c.nodule)
        records.append(
            {**c.record, "native_voxels_changed": changed, "nodule_mean_hu": round(mean_hu, 1), "seed": c.seed}
        )
    write_volume(files["ct"], ct, geometry)
    write_volume(files["label"], labels, geometry)
    sweep = np.concatenate([np.concatenate([c.site.ct, a], axis=2) for c, a in zip(ins, after)], axis=1)
    gif_sweep(files["gif"], sweep.astype(np.float32))
    return records


def synthesize_lesion_shard(
    items: Sequence[Item],
    cfg: Config,
    checkpoint: Path,
    roi_tables: dict[str, Path],
    preprocessed: dict[str, Path],
    bank_path: Path,
    out_dir: Path,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Make the lesion items of one shard in ``out_dir``; returns one manifest entry per item (made or skipped)."""
    from tqdm import tqdm

    lc = cfg.raw["lesion"]
    if not items:  # more shards than items: nothing to load the model for
        log.warning("this shard has no items: lesion.sample.shards (%d) is above the lesion run's item count; "
                    "lower it to use fewer jobs", lc["sample"]["shards"])  # fmt: skip
        return []
    model, diffusion, device, window, levels, candidates, ckpt = _setup(cfg, checkpoint, bank_path, threads)
    settings = run_settings(cfg, model_digest(ckpt), file_sha256(bank_path))
    # what auto became here, compared as the settings are: a resume on another device remakes items, never mixes
    settings["precision_used"] = precision_name(resolve_precision(lc["sample"]["precision"], device))
    texture = lesion_insert(cfg.raw)["texture"]  # bank: any where the model learns no class (data.source images)
    entries: dict[str, dict[str, Any]] = {}  # by item: the manifest in the order of items, whatever was skipped
    pending, inputs = [], {}
    for item in items:
        sites = read_sites(roi_tables[item.case_id])
        files = item_files(out_dir, item, len(sites))
        if item.case_id not in inputs:  # once per case: its k items read the same files
            sources = source_paths(cfg, item.case_id)  # images: the CT pasted into, its labels, their data files
            inputs[item.case_id] = item_inputs_sha256(roi_tables[item.case_id], preprocessed[item.case_id], sources)
        if provenance_complete(files, item_settings(settings, item, inputs[item.case_id])):
            log.info("%s: complete, skipped", item.name)
            entries[item.name] = {"item": item.name, "case_id": item.case_id, "skipped": True}
            continue
        for path in files.values():
            for stale in remove_stale_temps(path):
                log.info("%s: removed %s left by an interrupted write", item.name, stale.name)
        ins = [place(item.case_id, s, candidates, site_seed(item, j), lc["insert"], levels, texture,
                     float(lc["roi"]["nodule_fraction"])) for j, s in enumerate(sites)]  # fmt: skip
        pending.append((item, files, ins))
    # every nodule of the shard is inpainted in batches of lesion.sample.batch_size (items share batches)
    t0 = time.perf_counter()
    after = inpaint(model, diffusion, [c for _, _, ins in pending for c in ins], window, lc["sample"], device,
                    class_levels=levels)  # fmt: skip
    n_nodules = sum(len(ins) for _, _, ins in pending)
    per_nodule = (time.perf_counter() - t0) / max(1, n_nodules)
    if n_nodules:
        log.info("inpainted %d nodule(s): %.3f s per nodule (%s %d steps, batch %d)", n_nodules, per_nodule,
                 lc["sample"]["sampler"], lc["sample"]["steps"], lc["sample"]["batch_size"])  # fmt: skip
    done, refused, src, src_case = 0, {}, None, None
    for item, files, ins in tqdm(pending, desc="lesion paste-back", unit="item", mininterval=5.0):
        t1 = time.perf_counter()
        if item.case_id != src_case:  # a case's k items in a row read its CT once; the last one is let go first
            src = None
            src, src_case = load_source(item.case_id, preprocessed[item.case_id], cfg), item.case_id
        done += len(ins)
        try:
            records = _write_item(item, src, ins, after[done - len(ins) : done], files, cfg)
        except DicomError as exc:  # irregular slices: the shard's other items are still written, then it fails
            refused[item.case_id] = str(exc)
            continue
        write_json(
            files["provenance"],
            {
                "item": item.name,
                "source_case": item.case_id,
                "k": item.k,
                **item_settings(settings, item, inputs[item.case_id]),
                "checkpoint": str(checkpoint),
                "sites": records,
                "files": {k: p.name for k, p in files.items() if k != "provenance"},
                "device": str(device),
                "batch_size": lc["sample"]["batch_size"],  # how it ran (float rounding only: not compared)
                "seconds_per_nodule": round(per_nodule, 3),
                "seconds_paste_and_write": round(time.perf_counter() - t1, 2),
                "lungddpm_version": __version__,
            },
        )
        log.info("%s: %d nodule(s) pasted and written in %.1f s", item.name, len(ins), time.perf_counter() - t1)
        entries[item.name] = {"item": item.name, "case_id": item.case_id, "skipped": False, "nodules": len(ins),
                              "seconds_per_nodule": round(per_nodule, 3)}  # fmt: skip
    if refused:  # a rerun keeps the items written here and samples only those of these cases again
        raise DicomError("; ".join(refused.values()))
    return [entries[it.name] for it in items]


def texture_control(
    cfg: Config, checkpoint: Path, roi_tables: Sequence[Path], bank_path: Path, out_csv: Path, sites: int,
    threads: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Texture control: the same bank nodules, sites and seeds inpainted once per requested texture class; the
    mean HU of the inserted nodules per class beside that of the real nodules of the class in the same ROIs'
    cases (nodule ROIs of ``roi_tables``). A model that learnt no class (``data.source: images``: label maps carry
    no texture) is asked ``any`` once, beside every real nodule. Writes ``out_csv``; returns its rows."""
    lc = cfg.raw["lesion"]
    model, diffusion, device, window, levels, candidates, _ = _setup(cfg, checkpoint, bank_path, threads)
    chosen = [(t, s) for t in roi_tables for s in read_sites(t)][:sites]
    classes = ("any",) if insert_texture("bank", cfg.data.source) == "any" else TEXTURE_CLASSES
    real: dict[str, list[float]] = {c: [] for c in classes}
    for row, ct, _, nodule in real_nodule_rois(roi_tables):
        cls = "any" if classes == ("any",) else row["texture_class"]
        if cls in real:  # nodules of unknown texture (label maps) have no class to compare with
            real[cls].append(float(ct[nodule].mean()))
    rows = []
    for cls in classes:
        ins = [place(row_case(t), s, candidates, 7919 * j + lc["sample"]["seed"], lc["insert"], levels, cls,
                     float(lc["roi"]["nodule_fraction"])) for j, (t, s) in enumerate(chosen)]  # fmt: skip
        after = inpaint(model, diffusion, ins, window, lc["sample"], device, class_levels=levels)
        hu = [nodule_mean_hu(a, c.nodule) for c, a in zip(ins, after)]
        rows.append({"texture_class": cls, "n_inserted": len(hu), "inserted_mean_hu": float(np.mean(hu)),
                     "inserted_sd_hu": float(np.std(hu)), "n_real": len(real[cls]),
                     "real_mean_hu": float(np.mean(real[cls])) if real[cls] else float("nan"),
                     "real_sd_hu": float(np.std(real[cls])) if real[cls] else float("nan")})  # fmt: skip
        log.info("texture %s: inserted %.0f HU (n=%d), real %s HU (n=%d)", cls, rows[-1]["inserted_mean_hu"],
                 len(hu), f"{rows[-1]['real_mean_hu']:.0f}", len(real[cls]))  # fmt: skip
    write_csv(out_csv, rows)
    return rows


def row_case(table: Path) -> str:
    return Path(table).parent.name
