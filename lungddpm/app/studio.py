"""The nodule studio's logic (no web framework): open a case of the workflow's results, check a site, inpaint a
bank nodule there with the lesion model, paste it back at native resolution, undo, and export NIfTI + provenance.

The same functions as the lesion run (:mod:`lungddpm.synthesis.lesion`, :mod:`lungddpm.synthesis.paste`) do the
work: an ROI of ``lesion.roi`` is cut from the current (possibly already edited) CT around the site, the nodule is
placed at the site, the nodule dilated by ``lesion.insert.margin_mm`` is generated, and everything else is kept.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import atomic_folder, remove_stale_folders
from ..config import Config
from ..data.sources import dicom_root
from ..diffusion.checkpoint import model_digest
from ..diffusion.encoding import TEXTURE_CLASSES, texture_levels
from ..diffusion.precision import precision_name, resolve_precision
from ..errors import LungDDPMError, SamplingError
from ..io import Geometry, file_sha256, write_json, write_volume
from ..preprocessing.cases import list_cases
from ..preprocessing.layout import LUNG, NODULE, face_border
from ..preprocessing.rois import (
    RoiSettings,
    SourceCT,
    cut_roi,
    deep_lung,
    in_boxes,
    load_source,
    nodule_boxes,
    shift_inside,
    shift_inside_by_steps,
)
from ..settings import insert_texture
from ..synthesis.layout_edit import BankNodule, NoduleBank, fits, load_bank, place_at, placement_offset, rescale_mask
from ..synthesis.lesion import Insertion, Site, inpaint, insertion, load_lesion_model, nodule_mean_hu, run_settings
from ..synthesis.lesion_run import native_geometry
from ..synthesis.paste import native_box, native_labels, nearest_in_box, nodule_in_box, paste_nodule
from .checks import StudioError, check_seed

log = logging.getLogger(__name__)

CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TEXTURE_REQUESTS = ("bank", "any", *TEXTURE_CLASSES)
Progress = Callable[[int, int], None]


@dataclass
class Edit:
    """One inserted nodule: its record, the ROI before/after, and the native region it changed (for undo)."""

    record: dict[str, Any]
    roi: Geometry  # the ROI's grid
    roi_before: np.ndarray  # int16 HU [n, n, n]
    roi_after: np.ndarray  # int16 HU [n, n, n]
    roi_layout: np.ndarray  # uint8 [n, n, n], with the new nodule (and every other nodule in the ROI)
    roi_nodule: np.ndarray  # bool [n, n, n]: the new nodule alone
    slices: tuple[slice, slice, slice]  # the native box
    ct_before: np.ndarray  # int16 HU of the box before the edit
    labels_before: np.ndarray  # uint8 labels of the box before the edit
    seconds: float


def _nearest(volume: np.ndarray, to_index: Callable[[np.ndarray], np.ndarray], world: np.ndarray) -> np.ndarray:
    """[N]: the value of ``volume`` [K, I, J] at the voxel nearest each point ``world`` [N, 3] (x, y, z), mapped by
    ``to_index`` (a grid's ``world_to_index``); 0 (False) for a point outside it."""
    kij = np.round(to_index(world)).astype(int)
    inside = np.all((kij >= 0) & (kij < np.asarray(volume.shape)), axis=1)
    out = np.zeros(len(world), volume.dtype)
    out[inside] = volume[tuple(kij[inside].T)]
    return out


@dataclass
class CaseSession:
    """One case being edited: the source, the current CT and label map on its native grid, the edits so far."""

    case_id: str
    source: SourceCT
    geometry: Geometry
    ct: np.ndarray  # int16 HU [K, I, J], edited in place
    labels: np.ndarray  # uint8 0/1/2 [K, I, J]
    edits: list[Edit] = field(default_factory=list)
    deep_lung: np.ndarray | None = None  # fine-grid candidate sites, computed on the first random site
    changes: int = 0  # edits made and undone so far: a site checked before a later change is checked again

    def undo(self) -> Edit | None:
        """Restore the native region of the last edit; returns it (None when there is nothing to undo)."""
        if not self.edits:
            return None
        edit = self.edits.pop()
        self.changes += 1
        self.ct[edit.slices] = edit.ct_before
        self.labels[edit.slices] = edit.labels_before
        return edit

    def world(self, index_zyx: Sequence[int]) -> np.ndarray:
        """LPS (x, y, z) mm of native voxel (k, i, j)."""
        g, (k, i, j) = self.source.grid, index_zyx
        return np.array([g.x0 + j * g.col_spacing, g.y0 + i * g.row_spacing, float(g.z_positions[k])])


class Studio:
    """The lesion model, the nodule bank and the cases of one workflow directory (shared by every browser tab)."""

    def __init__(self, cfg: Config, workdir: Path, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.cfg, self.workdir = cfg, Path(workdir).resolve()
        self.results = self.workdir / "results"
        lc = cfg.raw["lesion"]
        self.checkpoint = self.results / "models" / "lesion" / lc["train"]["name"] / "checkpoint.pt"
        bank_path = self.workdir / "resources" / "nodule_bank.npz"
        if not self.checkpoint.is_file():
            raise self._missing_checkpoint(str(lc["train"]["name"]))
        if not bank_path.is_file():
            raise StudioError(
                f"{bank_path}: missing; the studio needs the workflow's nodule bank: run "
                f"`snakemake --cores all nodule_bank` in {self.workdir} (or the whole workflow) first"
            )
        self.model, self.diffusion, ckpt, self.device = load_lesion_model(self.checkpoint, lc)
        self.window = tuple(ckpt["hu_window"])
        self.levels = texture_levels(ckpt["config"]["lesion"]["texture_hu"], self.window)
        self.source = ckpt["config"]["data"]["source"]  # images: the model learnt no texture class (insert_texture)
        self.texture_requests = ("bank", "any") if self.source == "images" else TEXTURE_REQUESTS
        self.checkpoint_sha = model_digest(ckpt)
        self.bank: NoduleBank = load_bank(bank_path)
        self.bank_sha = file_sha256(bank_path)
        self.roi = RoiSettings.from_config(cfg)
        self.cases = tuple(c for c in list_cases(cfg, self.workdir) if self._lung_fine(c).is_file())
        if not self.cases:
            raise StudioError(f"{self.results / 'preprocessed'}: no preprocessed case; run the workflow first")

    def _missing_checkpoint(self, name: str) -> StudioError:
        found = sorted(str(p.relative_to(self.workdir)) for p in self.checkpoint.parents[1].glob("*/checkpoint.pt"))
        there = (f"; the lesion models there: {', '.join(found)} (lesion.train.name is the folder's name)" if found
                 else f"; there is no lesion model under {self.checkpoint.parents[1]}")  # fmt: skip
        return StudioError(
            f"{self.checkpoint}: missing: the studio needs the lesion model of lesion.train.name={name!r}. Start it "
            f"with the config the workflow ran with (--configfile) or check lesion.train.name{there}; or run "
            f"`snakemake --cores all {self.checkpoint.relative_to(self.workdir)}` in {self.workdir} (or the whole "
            "workflow) first"
        )

    def _lung_fine(self, case_id: str) -> Path:
        return self.results / "preprocessed" / case_id / "lung_fine.nii.gz"

    def candidates(
        self, diameter_mm: Sequence[float], textures: Sequence[int] = (), malignancies: Sequence[int] = ()
    ) -> list[BankNodule]:
        """Bank nodules with a diameter in [lo, hi] mm and, when given, one of the textures / malignancies."""
        min_readers = int(self.cfg.raw["lesion"]["insert"]["min_readers"])
        return self.bank.select(diameter_mm, textures, malignancies, min_readers)

    def nodule(self, index: int) -> BankNodule:
        """The bank nodule ``index``."""
        for n in self.bank.nodules:
            if n.index == int(index):
                return n
        raise StudioError(f"nodule bank: no nodule {index}; pick one from the list")

    def open_case(self, case_id: str) -> CaseSession:
        """The native CT of ``case_id`` (one of :attr:`cases`) and its label map (fine lung, consensus nodules)."""
        if not isinstance(case_id, str) or not CASE_ID.match(case_id) or case_id not in self.cases:
            raise StudioError(f"unknown case {case_id!r}: choose one of the workflow's cases: {', '.join(self.cases)}")
        try:
            src = load_source(case_id, self._lung_fine(case_id).parent, self.cfg, self.workdir)
            geometry = native_geometry(src)
        except (LungDDPMError, OSError) as exc:
            root, fine = dicom_root(self.cfg), self._lung_fine(case_id)
            root = root if root.is_absolute() else self.workdir / root
            fix = (f"Remake it: `snakemake --cores all {fine.relative_to(self.workdir)}` in {self.workdir}" if
                   str(fine) in str(exc) else f"Its source is read from {root} (data.source: {self.cfg.data.source}): "
                   "restore or fix it there")  # fmt: skip
            raise StudioError(f"case {case_id} cannot be opened: {exc}. {fix}, or choose another case") from exc
        ct = np.rint(src.hu).astype(np.int16)  # rounded, as the lesion run and the ROIs
        labels = native_labels(ct.shape, src.grid, src.lung_fine, src.fine, src.nodules)
        return CaseSession(case_id, replace(src, hu=ct), geometry, ct, labels)  # no float32 copy of the CT held

    def check_site(
        self, session: CaseSession, index_zyx: Sequence[int], nodule: BankNodule, texture: str = "any", seed: int = 0
    ) -> Insertion:
        """``nodule`` placed at native voxel ``index_zyx`` of the current CT, ready to inpaint with ``texture``
        (bank | any | a class) and ``seed``; :class:`StudioError` says why a site is refused: outside the lung, on or
        near a nodule (those read by fewer than ``data.min_readers`` radiologists too), the nodule not wholly in
        lung, or its generated region touching another nodule."""
        if texture not in (allowed := self.texture_requests):  # own images: the model learnt no class
            raise StudioError(f"texture {texture!r}: choose one of {', '.join(allowed)}")
        seed = check_seed(seed)
        k, i, j = (int(v) for v in index_zyx)
        if not all(0 <= v < n for v, n in zip((k, i, j), session.ct.shape)):
            raise StudioError(f"site {(k, i, j)} is outside the scan {session.ct.shape}")
        if session.labels[k, i, j] == NODULE:
            raise StudioError("that site is on a nodule: click in nodule-free lung")
        target = session.world((k, i, j))
        margin = float(self.cfg.raw["lesion"]["insert"]["margin_mm"])
        if in_boxes(target[None], _unused_boxes(session.source, margin))[0]:
            raise StudioError(
                f"that site is on (or within {margin} mm of) a nodule read by fewer than data.min_readers radiologists "
                "(not in the label map, but a real nodule): click in nodule-free lung"
            )
        if session.labels[k, i, j] != LUNG:
            raise StudioError("that site is outside the lung: click inside the lung (the tinted region)")
        lo, hi = session.source.bounds()
        # the ROI moved by the part of a voxel that puts the nodule's centroid on the site (place_at rounds to voxels)
        half = (self.roi.size - 1) / 2  # the site's ROI index on each axis, the ROI centred on it
        mask = rescale_mask(nodule.mask, nodule.spacing, (self.roi.spacing_mm,) * 3, self.roi.nodule_fraction)
        c = np.argwhere(mask).mean(axis=0)
        wanted = target + ((half - c) - np.round(half - c))[::-1] * self.roi.spacing_mm
        centre = shift_inside_by_steps(wanted, self.roi.half_extent_mm, lo, hi, self.roi.spacing_mm)
        offset = placement_offset(mask, self.roi.geometry(centre).world_to_index(target[None])[0])
        border = face_border(margin, self.roi.spacing_mm)
        if not fits(offset, mask.shape, (self.roi.size,) * 3, border):  # the whole steps inward cost the fit: the
            centre = shift_inside(wanted, self.roi.half_extent_mm, lo, hi)  # centroid up to half a voxel off the site
        roi = self.roi.geometry(centre)
        cut = cut_roi(replace(session.source, hu=session.ct), roi, self.roi)  # resample converts only the crop
        layout = cut["layout"].copy()
        world = roi.index_to_world(np.indices(layout.shape).reshape(3, -1).T)  # [n^3, 3] x, y, z of the ROI voxels
        layout[self._inserted_nodules_in(session, world).reshape(layout.shape)] = NODULE  # nodules inserted earlier
        unused = in_boxes(world, _unused_boxes(session.source, float(roi.spacing[0]) / 2)).reshape(layout.shape)
        try:
            edited, edit = place_at(layout, roi, nodule, roi.world_to_index(target[None])[0], border, mask)
        except LungDDPMError as exc:
            edge = np.abs(centre - wanted).max() > 1e-6 and "does not fit" in str(exc)  # the ROI shifted inward
            hint = ("the site is near the scan's edge, where the ROI cannot centre on it: click further from the "
                    "scan's first or last slice or its sides" if edge else "click further from that nodule (red)"
                    if "touch another nodule" in str(exc) else "click deeper inside the lung")  # fmt: skip
            raise StudioError(f"{exc}: {hint}, or choose a smaller nodule") from exc
        classes = self._texture_of_edits(session, world, cut["texture"], layout)  # the other nodules' classes
        site = Site(f"{session.case_id}_studio{len(session.edits)}", cut["ct"], layout, roi, classes)
        edit = {**edit, "site_index_kij": [k, i, j], "site_lps_mm": [round(float(v), 2) for v in target]}
        ins = insertion(site, edited, edit, nodule, margin, self.levels, insert_texture(texture, self.source), seed)
        box = native_box(session.source.grid, session.ct.shape, roi, self.roi.size)
        touches = bool((ins.generated & ((layout == NODULE) | unused)).any())  # and on the CT's own grid, where the
        if box is not None:  # paste changes each voxel nearest a generated one (a nodule's rim, finer than the ROI's)
            touches |= bool((session.labels[box.slices][nearest_in_box(box, ins.generated)] == NODULE).any())
        if touches:
            raise StudioError(
                f"too close to another nodule: the generated region (the nodule + {margin} mm) would touch it; "
                "click further away from it or choose a smaller nodule"
            )
        fraction = float(self.cfg.raw["preprocess"]["nodule_fraction"])
        if box is not None and (session.labels[box.slices][nodule_in_box(box, session.source.grid, roi, ins.nodule,
                                                                        fraction)] == 0).any():  # fmt: skip
            raise StudioError(  # the ROI's lung is the CT's resampled: its edge can reach past the CT's own
                "the nodule would reach outside the lung on the CT's own grid: click deeper inside the lung or choose "
                "a smaller nodule"
            )
        ins.record["checked_at_change"] = session.changes  # generate refuses it once the case has changed
        return ins

    @staticmethod
    def _texture_of_edits(
        session: CaseSession, world: np.ndarray, texture: np.ndarray, layout: np.ndarray
    ) -> np.ndarray:
        """The ROI's texture map (uint8 [n, n, n], as :func:`cut_roi`'s: the real nodules' classes) with the class
        asked for each nodule inserted before (none for ``any``), so the network sees each at its own level."""
        texture = texture.copy()
        for e in session.edits:
            if (cls := e.record["texture_requested"]) not in TEXTURE_CLASSES:
                continue
            theirs = _nearest(e.roi_nodule, e.roi.world_to_index, world).reshape(layout.shape)  # in that edit's ROI
            texture[theirs & (layout == NODULE)] = 1 + TEXTURE_CLASSES.index(cls)
        return texture

    @staticmethod
    def _inserted_nodules_in(session: CaseSession, world: np.ndarray) -> np.ndarray:
        """bool [N]: points ``world`` [N, 3] whose nearest native voxel an inserted nodule labels (real: cut_roi's)."""
        kij, hit = np.round(session.source.grid.world_to_index(world)), np.zeros(len(world), bool)
        for e in session.edits:  # its own box, no whole-CT mask; a later edit never touches an earlier nodule
            new = (session.labels[e.slices] == NODULE) & (e.labels_before != NODULE)
            hit |= _nearest(new, lambda _, e=e: kij - [s.start for s in e.slices], world)
        return hit

    def random_site(
        self, session: CaseSession, nodule: BankNodule, seed: int, tries: int = 200
    ) -> tuple[int, int, int]:
        """A seeded random valid site (native k, i, j) for ``nodule``: a lung voxel at least
        ``lesion.roi.site_min_depth_mm`` deep where :meth:`check_site` accepts it."""
        seed = check_seed(seed)
        if session.deep_lung is None:
            session.deep_lung = deep_lung(session.source, self.roi.site_min_depth_mm)
        cand = session.deep_lung
        rng = np.random.default_rng(seed)
        for _ in range(tries if cand.size else 0):
            world = session.source.fine.index_to_world(cand[int(rng.integers(len(cand)))][None])
            kij = np.round(session.source.grid.world_to_index(world)[0]).astype(int)
            try:
                self.check_site(session, kij, nodule)
            except StudioError:
                continue
            return int(kij[0]), int(kij[1]), int(kij[2])
        raise StudioError(
            f"no valid site for a {nodule.diameter_mm:.1f} mm nodule in {tries} random tries: choose a smaller nodule"
        )

    def generate(self, session: CaseSession, ins: Insertion, progress: Progress | None = None) -> Edit:
        """Inpaint ``ins`` (:meth:`check_site`), paste it into the case's CT and label map; the edit is appended to
        the session. ``progress(step, steps)`` is called after each sampler step; a site checked before the case's
        last edit or undo is refused (its checks were made on the CT as it was)."""
        if ins.record.get("checked_at_change") != session.changes:
            raise StudioError(
                f"site {ins.record['site_index_kij']}: the case changed (a nodule inserted or undone) since this site "
                "was checked: check it again (Studio.check_site)"
            )
        t0 = time.perf_counter()
        lc = self.cfg.raw["lesion"]
        try:
            after = inpaint(self.model, self.diffusion, [ins], self.window, lc["sample"], self.device, progress,
                            self.levels)[0]  # fmt: skip
        except SamplingError as exc:  # said in the page, not as a popup
            raise StudioError(f"{self.checkpoint}: {exc}") from exc
        roi = ins.site.geometry
        box = native_box(session.source.grid, session.ct.shape, roi, self.roi.size)
        if box is None:  # check_site shifts every ROI inside the scan
            raise StudioError(f"site {ins.record['site_index_kij']}: its ROI misses the scan")
        ct_before, labels_before = session.ct[box.slices].copy(), session.labels[box.slices].copy()
        changed = paste_nodule(session.ct, session.labels, box, session.source.grid, roi, ins.nodule, ins.generated,
                               after, float(lc["insert"]["feather_mm"]),
                               float(self.cfg.raw["preprocess"]["nodule_fraction"]))  # fmt: skip
        mean_hu = round(nodule_mean_hu(after, ins.nodule), 1)
        record = {k: v for k, v in ins.record.items() if k != "checked_at_change"}
        record = {**record, "native_voxels_changed": changed, "nodule_mean_hu": mean_hu, "seed": ins.seed}
        edit = Edit(record, roi, ins.site.ct, after, ins.layout, ins.nodule, box.slices, ct_before, labels_before,
                    time.perf_counter() - t0)  # fmt: skip
        session.edits.append(edit)
        session.changes += 1
        log.info("%s: bank nodule %d (%s) at %s in %.2f s", session.case_id, record["bank_index"],
                 record["texture_requested"], record["site_index_kij"], edit.seconds)  # fmt: skip
        return edit

    def export(self, session: CaseSession) -> dict[str, Path]:
        """Write the edited CT (int16 HU) and label map (0/1/2) on the native grid, each site's ROI before, after and
        its layout, and the provenance to a new folder ``results/studio/<case>/<time>/``; returns the paths. The
        folder appears whole or not at all, never onto an earlier download (:func:`lungddpm.atomic.atomic_folder`)."""
        if not session.edits:
            raise StudioError("nothing to download yet: insert a nodule first")
        stamp, case_dir = time.strftime("%Y%m%d-%H%M%S"), self.results / "studio" / session.case_id
        remove_stale_folders(case_dir)  # what killed downloads left (22 MB each), never one being written now
        with atomic_folder(case_dir / stamp, replace=False) as folder:
            names = self._write_export(session, folder.tmp)
        return {key: folder.path / name for key, name in names.items()}

    def _write_export(self, session: CaseSession, folder: Path) -> dict[str, str]:
        """:meth:`export`'s files in ``folder``; returns their names by key (``provenance`` last)."""
        base = f"{session.case_id}_studio"
        files = {"ct": folder / f"{base}_ct.nii.gz", "label": folder / f"{base}_label.nii.gz"}
        write_volume(files["ct"], session.ct, session.geometry)
        write_volume(files["label"], session.labels, session.geometry)
        for j, e in enumerate(session.edits):  # each site's ROI, as the lesion run writes them
            for kind, volume in (("before", e.roi_before), ("after", e.roi_after), ("layout", e.roi_layout)):
                files[f"s{j}_{kind}"] = folder / f"{base}_s{j}_{kind}.nii.gz"
                write_volume(files[f"s{j}_{kind}"], volume, e.roi)
        write_json(folder / f"{base}.json", {
            "item": base, "source_case": session.case_id, "tool": "lungddpm app",
            **run_settings(self.cfg, self.checkpoint_sha, self.bank_sha), "checkpoint": str(self.checkpoint),
            "note": "insert.texture and sample.seed are the config's defaults; each site's are in sites",
            "sites": [e.record for e in session.edits], "files": {k: p.name for k, p in files.items()},
            "device": str(self.device),
            "precision_used": precision_name(resolve_precision(self.cfg.raw["lesion"]["sample"]["precision"],
                                                               self.device)),
            "seconds_per_nodule": [round(e.seconds, 3) for e in session.edits],
            "lungddpm_version": __version__,
        })  # fmt: skip
        return {**{k: p.name for k, p in files.items()}, "provenance": f"{base}.json"}


def _unused_boxes(src: SourceCT, margin_mm: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """World (x, y, z) boxes of ``src.avoid`` (LIDC clusters below ``data.min_readers``) grown by ``margin_mm``,
    as the nodule-free ROIs avoid them."""
    return nodule_boxes(replace(src, nodules=()), margin_mm)


def bench_sites(cfg: Config, workdir: Path, sites: int, threads: int) -> Iterator[dict[str, Any]]:
    """The nodule studio's work per click (check the site, inpaint, paste back) for ``sites`` seeded random sites
    in the first case of ``workdir``, each with the largest bank nodule the config allows."""
    t0 = time.perf_counter()
    studio = Studio(cfg, workdir, threads)
    session = studio.open_case(studio.cases[0])
    nodule = max(studio.candidates(cfg.raw["lesion"]["insert"]["diameter_mm"]), key=lambda n: n.diameter_mm)
    yield {"what": "open", "case": session.case_id, "seconds": round(time.perf_counter() - t0, 3)}
    for seed in range(sites):
        site = studio.random_site(session, nodule, seed)
        t1 = time.perf_counter()
        ins = studio.check_site(session, site, nodule, "bank", seed)
        t2 = time.perf_counter()
        edit = studio.generate(session, ins)
        yield {"what": "nodule", "site": list(site), "diameter_mm": nodule.diameter_mm, "check_s": round(t2 - t1, 3),
               "generate_s": round(edit.seconds, 3), "total_s": round(time.perf_counter() - t1, 3)}  # fmt: skip
