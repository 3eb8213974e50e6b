"""The lesion run (DESIGN §5): nodules from the bank inpainted into nodule-free ROIs of train CTs, pasted back into
the full CT on its native grid.

Per site (a nodule-free ROI): a bank nodule (filtered by diameter, texture, malignancy; rescaled to the ROI
spacing) is placed wholly inside the ROI's lung; the *generated region* is the new nodule dilated by
``lesion.insert.margin_mm``, kept off the ROI's faces so that the paste-back weight falls to 0 all round; everything
else in the ROI is kept (anatomically-aware sampling at the sample's noise
level, :func:`lungddpm.diffusion.sample.sample`), conditioned on the edited layout with the requested texture's
level in the nodule channel. Per item (a train case x k) the generated regions of all its sites are pasted back
(:mod:`.paste`) into the source CT. Files of item ``<case>_<k>``: ``_ct.nii.gz`` (int16 HU, the source's native
grid and affine), ``_label.nii.gz`` (0/1/2 with the new nodules), per site ``_s<j>_before/_after/_layout.nii.gz``
(the ROI) and ``_s<j>_montage.png``, ``.gif``, and ``.json`` provenance written last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..diffusion.checkpoint import CheckpointError, load_for_sampling
from ..diffusion.encoding import (
    ANY_TEXTURE,
    TEXTURE_CLASSES,
    context_channels,
    hu_to_model,
    layout_to_channels,
    model_to_hu,
    texture_class,
    texture_values,
)
from ..diffusion.precision import resolve_precision
from ..diffusion.process import DiffusionConfig, GaussianDiffusion
from ..diffusion.sample import Blend, Resample, sample
from ..errors import LayoutError, SamplingError
from ..io import Geometry, files_sha256, read_volume, safe_component
from ..preprocessing.layout import NODULE, check_labels, dilate_mm, face_border
from ..preprocessing.rois import read_roi_table
from ..settings import lesion_insert, without_later_defaults
from ..versions import output_version
from .layout_edit import BankNodule, insert_nodules
from .plan import Item, sampling_what

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """An ROI of a case to insert into: the workflow's are nodule-free; the studio's may hold other nodules."""

    name: str
    ct: np.ndarray  # int16 HU [n, n, n]
    layout: np.ndarray  # uint8 [n, n, n]
    geometry: Geometry
    texture: np.ndarray | None = None  # uint8 [n, n, n]: its nodules' classes (0 = none known, 1 + class); None: 0


@dataclass(frozen=True)
class Insertion:
    """One nodule placed in a site, ready to inpaint."""

    site: Site
    layout: np.ndarray  # the edited layout
    nodule: np.ndarray  # bool: the new nodule
    generated: np.ndarray  # bool: the new nodule dilated by the margin (the rest is kept)
    level: float  # nodule-channel value (texture class level or ANY_TEXTURE)
    record: dict[str, Any]
    seed: int
    others: np.ndarray | None = None  # float32 [n, n, n]: the site's other nodules' values; None: ANY_TEXTURE


def read_sites(table: Path) -> list[Site]:
    """The nodule-free ROIs of one case's ``rois.csv``; a layout file with labels beyond 0/1/2 is refused by name
    when read, before any site of the shard is inpainted."""
    sites = []
    for row in read_roi_table(table):
        if row["kind"] != "free":
            continue
        folder = Path(table).parent
        ct, geometry = read_volume(folder / row["ct"])
        layout, _ = read_volume(folder / row["layout"])
        check_labels(layout, str(folder / row["layout"]), "rerun the rois rule for its case")
        sites.append(Site(row["roi"], ct, layout.astype(np.uint8), geometry))
    return sites


def texture_level(request: str, nodule: BankNodule, levels: Sequence[float]) -> tuple[float, str]:
    """Nodule-channel value and class name for ``request`` (bank | any | a class name)."""
    if request == "any":
        return ANY_TEXTURE, "any"
    cls = texture_class(nodule.texture) if request == "bank" else TEXTURE_CLASSES.index(request)
    return float(levels[cls]), TEXTURE_CLASSES[cls]


def place(
    case_id: str,
    site: Site,
    candidates: Sequence[BankNodule],
    seed: int,
    insert: dict[str, Any],
    levels: Sequence[float],
    texture: str,
    fraction: float = 0.5,
) -> Insertion:
    """Draw a nodule for ``site`` (seeded), place it inside the site's lung, and make the generated region;
    ``fraction``: ``lesion.roi.nodule_fraction`` (:func:`~.layout_edit.rescale_mask`)."""
    if not candidates:  # the lesion run refuses this earlier, naming the filters (NoduleBank.matching)
        raise LayoutError(f"{case_id}: no bank nodule matches lesion.insert; widen its filters")
    rng = np.random.default_rng(seed)
    try:
        border = face_border(insert["margin_mm"], float(site.geometry.spacing[0]))  # no generated voxel on a face
        layout, edits = insert_nodules(site.layout, site.geometry, candidates, 1, rng, insert["max_attempts"], border,
                                       fraction)  # fmt: skip
    except LayoutError as exc:
        raise LayoutError(
            f"{case_id}: site {site.name} has no room for a nodule of {insert['diameter_mm']} mm inside its lung "
            f"({exc}); lower lesion.insert.diameter_mm, raise lesion.roi.site_min_depth_mm or lesion.roi.size"
        ) from exc
    bank_nodule = next(n for n in candidates if n.index == edits[0]["bank_index"])
    return insertion(site, layout, edits[0], bank_nodule, insert["margin_mm"], levels, texture, seed)


def insertion(
    site: Site,
    layout: np.ndarray,
    edit: dict[str, Any],
    bank_nodule: BankNodule,
    margin_mm: float,
    levels: Sequence[float],
    texture: str,
    seed: int,
) -> Insertion:
    """A nodule placed in ``site`` (``layout``: the site's layout with it; ``edit``: its layout-edit record), ready
    to inpaint: the generated region is the new nodule dilated by ``margin_mm``, the level is ``texture``'s."""
    nodule = (layout == NODULE) & (site.layout != NODULE)
    spacing = float(site.geometry.spacing[0])
    generated = dilate_mm(nodule, margin_mm, spacing)
    level, cls = texture_level(texture, bank_nodule, levels)
    record = {"site": site.name, **edit, "texture_class_bank": TEXTURE_CLASSES[texture_class(bank_nodule.texture)],
              "texture_requested": cls, "nodule_level": level, "generated_voxels": int(generated.sum())}  # fmt: skip
    others = None if site.texture is None else texture_values(site.texture, levels)
    return Insertion(site, layout, nodule, generated, level, record, seed, others)


def guidance_layouts(
    chunk: Sequence[Insertion],
    extra: list[np.ndarray],
    layout: torch.Tensor,
    against: str,
    class_levels: Sequence[float],
    device: torch.device,
) -> torch.Tensor | list[torch.Tensor]:
    """The layouts the texture guidance pushes away from: ``any`` texture (one layout), or ``classes``: the three
    texture classes, whose mean the guidance departs from towards the requested one. Where every nodule of the chunk
    asks for a class, its own is ``layout`` (the conditional pass, reused) and the other two follow; otherwise
    (``any`` asked for) all three classes. [B, C, n, n, n] each."""
    if against == "any":  # "any texture": the unconditional pass of classifier-free guidance
        return _network_layouts(chunk, [ANY_TEXTURE] * len(chunk), extra).to(device)
    if len(class_levels) != len(TEXTURE_CLASSES):
        raise ValueError(f"guidance against the texture classes needs their {len(TEXTURE_CLASSES)} levels, got "
                         f"{list(class_levels)}")  # fmt: skip
    own = all(c.level in class_levels for c in chunk)
    orders = [[c.level, *(v for v in class_levels if v != c.level)] if own else list(class_levels) for c in chunk]
    rest = [_network_layouts(chunk, [o[k] for o in orders], extra).to(device) for k in range(int(own), 3)]
    return [layout, *rest] if own else rest


def inpaint(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    insertions: Sequence[Insertion],
    window: tuple[float, float],
    sc: dict[str, Any],
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
    class_levels: Sequence[float] = (),
) -> list[np.ndarray]:
    """Inpaint the generated regions of ``insertions`` in batches of ``sc['batch_size']`` -> the ROIs after, int16
    HU [n, n, n] each (source HU outside the generated region, bit for bit). ``progress``: per sampler step. A
    context model (``model.context``) also gets the known ROI and the keep mask as input channels. ``class_levels``:
    the texture classes' nodule-channel values (:func:`..diffusion.encoding.texture_levels`), which guidance
    against the classes (``sc['guidance_against']``) needs."""
    dtype = resolve_precision(sc["precision"], device)
    out: list[np.ndarray] = []
    for start in range(0, len(insertions), int(sc["batch_size"])):
        chunk = insertions[start : start + int(sc["batch_size"])]
        ref = torch.from_numpy(np.stack([hu_to_model(c.site.ct, window)[None] for c in chunk]))
        keep = torch.from_numpy(np.stack([~c.generated[None] for c in chunk]))
        extra = [context_channels(r[0].numpy(), k[0].numpy()) for r, k in zip(ref, keep)] if model.cfg.context else []
        layout = _network_layouts(chunk, [c.level for c in chunk], extra).to(device)
        uncond = None
        if float(sc["guidance"]) != 1.0:
            uncond = guidance_layouts(chunk, extra, layout, sc.get("guidance_against", "any"), class_levels, device)
        generators = [torch.Generator().manual_seed(c.seed) for c in chunk]
        try:
            x = sample(model, diffusion, layout, sc["sampler"], sc["steps"], generators, blend=Blend(ref, keep),
                       autocast_dtype=dtype, clip_x0=sc["clip_x0"], guidance=float(sc["guidance"]),
                       resample=Resample(int(sc["jump_length"]), int(sc["jump_n_sample"])), uncond_layout=uncond,
                       progress=progress, timestep_spacing=sc["timestep_spacing"])  # fmt: skip
        except SamplingError as exc:
            names = ", ".join(c.site.name for c in chunk)
            raise SamplingError(f"sites {names}: {exc} (lesion.sample.precision: fp32)") from exc
        for b, c in enumerate(chunk):
            hu = np.round(model_to_hu(x[b, 0].float().cpu().numpy(), window))
            out.append(np.where(c.generated, hu, c.site.ct).astype(np.int16))
    return out


def _network_layouts(chunk: Sequence[Insertion], levels: Sequence[float], extra: Sequence[np.ndarray]) -> torch.Tensor:
    """The network's layout input of a batch of insertions -> [B, 2 (+2 context), n, n, n]: the new nodule at
    ``levels[b]``, any other nodule of the site (the studio's: one inserted before, a real one) at its own class's
    level where known (``Insertion.others``), else :data:`ANY_TEXTURE`, as training gives them (it took the new
    nodule's level: a real ground-glass nodule was told solid when a solid one was inserted beside it); ``extra``:
    the context channels per insertion, or empty."""
    lays = [layout_to_channels(c.layout, c.site.name, np.where(c.nodule, np.float32(v),
                                                               ANY_TEXTURE if c.others is None else c.others))
            for c, v in zip(chunk, levels)]  # fmt: skip
    if extra:
        lays = [np.concatenate([lay, e]) for lay, e in zip(lays, extra)]
    return torch.from_numpy(np.stack(lays))


def nodule_mean_hu(roi_hu: np.ndarray, nodule: np.ndarray) -> float:
    return float(roi_hu[nodule].mean())


ROI_SCALE = ("spacing_mm", "size", "nodule_fraction")  # the lesion.roi keys that shape what the model sees


def load_lesion_model(
    checkpoint: Path, lesion: dict[str, Any]
) -> tuple[torch.nn.Module, GaussianDiffusion, dict[str, Any], torch.device]:
    """The lesion network (EMA weights by default, per ``lesion.sample``) on the GPU when there is one, its process
    and checkpoint; a model trained on ROIs of another scale than ``lesion.roi`` cuts is refused (the lesion run
    did not check it, so a model kept past a change of ROI settings inpainted at the wrong scale)."""
    sc = lesion["sample"]
    net, ckpt, device = load_for_sampling(checkpoint, sc["use_ema"], sc["compile"])  # compiles at the first batch
    roi = ckpt.get("config", {}).get("lesion", {}).get("roi", {})
    grid = [roi.get("size")] * 3, [roi.get("spacing_mm")] * 3
    if not roi or list(ckpt.get("size", [])) != grid[0] or [float(s) for s in ckpt.get("spacing_mm", [])] != grid[1]:
        raise CheckpointError(
            f"{checkpoint}: not a lesion-scale model (its grid {ckpt.get('size')} at {ckpt.get('spacing_mm')} mm is "
            f"not lesion.roi's {grid[0]} at {grid[1]} mm: a whole-volume model?); point lesion at the checkpoint "
            "that train_lesion wrote (results/models/lesion/<lesion.train.name>/checkpoint.pt)"
        )
    diff = [f"lesion.roi.{k} is {lesion['roi'].get(k)} here, {roi.get(k)} in training" for k in ROI_SCALE
            if lesion["roi"].get(k) != roi.get(k)]  # fmt: skip
    if diff:
        raise CheckpointError(
            f"{checkpoint}: {'; '.join(diff)}: ROIs would be cut at a scale the lesion model was not trained on; use "
            "the config it was trained with (--configfile), or retrain it with these settings (`snakemake --cores "
            f"all results/models/lesion/{checkpoint.parent.name}/checkpoint.pt`)"
        )
    return net, GaussianDiffusion(DiffusionConfig(**ckpt["diffusion"])), ckpt, device


def item_files(out_dir: Path, item: Item, n_sites: int) -> dict[str, Path]:
    base = safe_component(item.name, "lesion item")
    files = {"ct": f"{base}_ct.nii.gz", "label": f"{base}_label.nii.gz", "gif": f"{base}.gif"}
    for j in range(n_sites):
        for kind in ("before", "after", "layout"):
            files[f"s{j}_{kind}"] = f"{base}_s{j}_{kind}.nii.gz"
        files[f"s{j}_montage"] = f"{base}_s{j}_montage.png"
    return {**{k: Path(out_dir) / v for k, v in files.items()}, "provenance": Path(out_dir) / f"{base}.json"}


def run_settings(cfg: Config, ckpt_sha: str, bank_sha: str | None = None) -> dict[str, Any]:
    """What every item's files depend on besides its own seed and inputs (a rerun redoes items whose provenance
    disagrees): the model, the nodule bank, ``lesion.sample`` / ``insert`` (less ``samples_per_case``: how many
    items, not what one holds) / ``roi``, ``preprocess.nodule_fraction`` (the pasted CT's native nodule labels) and
    the HU range a CT is read at (``padding_hu``, ``max_hu``: the pasted CT is the whole CT, whose clipped bone a
    changed ceiling rewrote where the ROIs, deep in the lung, kept every voxel)."""
    sample = sampling_what(cfg.raw["lesion"]["sample"])  # what, not how (batching, compiling, sharding), as the rule
    insert = {k: v for k, v in lesion_insert(cfg.raw).items() if k != "samples_per_case"}  # bank: any for images
    pre = cfg.raw["preprocess"]
    out = {"model_sha256": ckpt_sha, "sample": sample, "insert": insert, "roi": cfg.raw["lesion"]["roi"],
           **without_later_defaults({"nodule_fraction": pre["nodule_fraction"]}),
           "hu_read": [pre["padding_hu"], pre["max_hu"]]}  # fmt: skip
    out.update(output_version("synthesize_lesion"))  # a bump remakes items made by older code
    return out if bank_sha is None else {**out, "bank_sha256": bank_sha}


def item_inputs_sha256(table: Path, preprocessed: Path, sources: Sequence[str | Path] = ()) -> str:
    """One digest of what an item reads besides the settings: its case's ``rois.csv``, the nodule-free ROIs it names
    (CT and layout), the fine lung mask the paste-back labels with and ``sources``, the case's source files that the
    paste-back writes into (:func:`lungddpm.data.sources.source_paths`: images' CT and label map, and the files
    holding their voxels). DICOM sources have none, so their digest is the one computed before source files were
    hashed."""
    rows = [r for r in read_roi_table(table) if r["kind"] == "free"]
    folder = Path(table).parent
    sites = [folder / r[k] for r in rows for k in ("ct", "layout")]
    return files_sha256([Path(table), *sites, Path(preprocessed) / "lung_fine.nii.gz", *map(Path, sources)])


def site_seed(item: Item, j: int) -> int:
    return (item.seed + 1_000_003 * j) % 2**62
