"""What version of its code each workflow stage's outputs were made by.

A stage's logic lives in this package, not in the rule's ``script:``, so Snakemake's ``code`` rerun trigger never
sees it change. Instead each rule passes :func:`output_version` of its own name among its params, and the stages that
keep finished work through a rerun compare it too: the trainings' resume fingerprint, the sampled items' provenance
(``sample``, ``synthesize_lesion``) and nnU-Net's reuse stamp (``segment_train``). Bump a stage's number in
:data:`OUTPUT_VERSIONS`, with a line saying why, when a code change alters its outputs for the same inputs and
config: ``snakemake`` then reruns that stage, and the stages after it, in every existing workdir (what reads unchanged
inputs still reuses its work: a training resumes, an item whose provenance matches is kept). A bumped training
refuses to resume state of the older code and says how to train anew. Version 1 is left out of params and
comparisons, so that a workdir made before a stage had a version does not rerun for the number alone. The
image-quality feature cache is keyed by its extractor (weights, preprocessing settings and
``metrics.features.PREPROCESSING_VERSION``), not by this number.
"""

from __future__ import annotations

from typing import Final

from .errors import LungDDPMError

# One entry per Snakemake rule (``all`` aside); tests/test_versions.py checks that each rule passes its own.
OUTPUT_VERSIONS: Final[dict[str, int]] = {
    "demo_dicom": 1,  # the phantom has its own version too (PHANTOM_VERSION, a param of the rule)
    "split": 2,  # 2: own images' <patient>_s<n> series kept in one subset; train keeps a nodule patient
    "demo_qc": 2,  # 2: the n_missing column
    "demo_qc_table": 1,
    # 2: one-slice nodules labelled in full, nodules no longer cut short by their outer half-slices, no +x/+y
    # field-of-view edge band of padding HU, no table midline (labels and HU made before then differ)
    # 3: lung holes across the body midline filled only up to lungmask.midline_hole_max_mm (lungs meeting around
    # the mediastinum no longer take it in, nor the trachea)
    # 4: a coverage probe on a voxel boundary counts for the upper voxel (np.round's ties to even): labels change on
    # grids commensurate with the scan's (config/paper.yaml: 6 voxels of LIDC-IDRI-0171 at some centres), not the demo
    # 5: a main bronchus that the lung encloses in-plane is no longer put back as lung with the lung's holes (the
    # demo: 15-64 voxels of the 2 mm lung mask in each of its 12 cases, at the hilum)
    # 6: an enclosed air-like space outside the torso's core (a table's foam or hollow core) is no lung component
    # 7: the lung mask's edge repair propagates past the first pass's lung slices (a chest cropped in front or behind
    # lost its lungs below the cut); the trachea seeded in the top 22 mm (it was 11 slices at any fine_spacing_mm); the
    # demo's and the paper config's masks are unchanged (2 mm: 11 slices); the model-grid lung mask sampled linearly
    # (> 0.5, as the ROIs'): nearest-neighbour put it 1 mm towards -x/-y/-z where the grids were half a voxel apart
    "preprocess": 7,
    "layout": 1,
    # 2: the labels as preprocess 2 (the same code); 3: a nodule ROI's jitter keeps its nodule whole where it fits
    # (the demo's 24 mm nodule of LIDC-IDRI-0709 was jittered onto a face of its 40 mm ROI)
    # 4: as preprocess 4 (the demo: LIDC-IDRI-0709_n6_0, moved inside the scan, 45 -> 47 nodule voxels)
    # 5: the free sites and each nodule's jitters drawn from streams of their own (rois.roi_stream): changing
    # rois_per_nodule or the nodule list moved every free site of a case
    "rois": 5,
    # 2: the loss scored against the fp32 target (a bf16 run rounded it onto the output's bf16 grid first); an fp16
    # step that GradScaler skips leaves the EMA as it was
    "train": 2,  # also in its resume fingerprint (train_lesion: its own number)
    "import_checkpoint": 1,
    "nodule_bank": 1,
    # 2: no cut bank tails, no paste-back rim outside the generated region, ddim / short ddpm schedules no longer
    # one level off: items made before then are remade (their provenance lacks the 2)
    # 3: an inserted bank nodule rescaled on a grid centred on its bounding box (not its centroid) and never split
    # 4: a bank nodule's rescale counts a probe on a voxel boundary for the upper voxel (np.round's ties to even
    # gave even voxels 1.2^3 of their coverage and odd ones 0.8^3: 48-144 of the demo bank's 340 masks change)
    "sample": 4,
    # 2: SSIM / PSNR on the HU window, PSNR capped at 100 dB, intervals resampling patients; 3: a paired row's n_b is
    # the patients its interval resamples (it repeated the pairs)
    # 4: medicalnet's z-score over the voxels above the lower clip, the fill 0 (MedicalNet's rule; astra's and
    # random's features are unchanged, their cache still serves)
    # 5: MMD's three rows and every resample of a region on one kernel (a bandwidth of every set pooled)
    # 6: the paired metrics (MSE, MAE, lung W1, nodule HU and volume) on both volumes clipped to intensity.hu_window,
    # as PSNR and SSIM were: raw HU charged the model for real voxels outside the window its outputs cannot leave
    # 7: the distribution metrics take metrics.samples_per_layout samples of each layout (default 1; several biased
    # them and the excess upward), and the table counts the layouts (layouts_a); the demo keeps 2 (unchanged values)
    "metrics": 7,
    # 2: the reading rule against the real-vs-real interval; 3: the baseline arm named, a run's every device, a W1
    # outside its own interval marked (a workdir's report is remade once; nothing before it reruns)
    # 4: the size-matched rows said "nearest in voxel count"; they match in log voxel count (as they always did)
    # 5: the lesion section names every batch size, device, sampler, feather and margin of the items (the last's)
    # 6: a stage switched off (segmentation.enabled, lesion.enabled) keeps its heading with a "Not run" line
    # 7: with lesion.enabled false and a segmentation arm of synthetic_source lesion, the lesion run is shown and the
    # heading says that only its fidelity and texture control did not run (it said the lesion stages had not)
    "report": 7,
    # 2: with real_fraction < 1, synthetic cases only from those built on the real data the arm sees (the others
    # brought a left-out real CT or nodule-free ROI back); arms whose cases do not change reuse their trainings
    # 3: a fraction x count that is an exact half rounds up as documented (0.29 x 50 -> 15; the float product fell
    # below 14.5 and gave 14); the demo's arms are unchanged
    # 4: a low-data lesion arm draws nodules seen in each other's ROIs together (one's ROIs hold the other's label);
    # real_fraction 1 arms are unchanged
    "segment_prepare": 4,
    "segment_train": 1,
    # 2: ground-truth nodules 26-connected, as the predictions; 3: a nodule smaller than min_overlap_voxels is found
    # by a component covering all of it, a nodule ROI detects its own nodule only (a neighbour in it was counted
    # again), and nodules seen in each other's ROIs are one cluster
    # 4: clusters of ROI-sharing nodules reach a voxel further
    # 5: scores written exactly (17 significant digits): at 6, k/3 detections averaged over folds left a difference
    # of 2e-7 where it was 0 (the Wilcoxon test ranked it) and equal differences unequal (the t-test gave p 1e-18)
    # 6: a component touching a nodule by fewer than min_overlap_voxels is no false positive (the default 1: as before)
    "segment_score": 6,
    # 2: float rounding of an exact zero difference is 0 (the paired test ranked 1.85e-17); a mean over no case is
    # marked n/a in comparison.png, not drawn as a bar of 0
    "segment_compare": 2,
    "segment_sweep": 1,
    # 2: the focus weight covers every voxel within lesion.train.focus_margin_mm (the margin was rounded to whole
    # voxels: 31 % of the demo's voxels within 3 mm of a nodule missed it)
    # 3: as train 2 (the fp32 loss target, fp16's skipped steps)
    "train_lesion": 3,
    # 2: as sample (bank tails, the paste-back's rim, the sampler's schedule); 3: as sample (the bank's rescale);
    # 4: as sample 4 (a boundary probe of the rescale's coverage); 5: RePaint's jumps aligned with the end, as its
    # get_schedule_jump (items sampled with lesion.sample.jump_length > 0 differ; counted from the start before);
    # 6: the native label map keeps the lung on the series' last slices past the fine grid's last voxel (background)
    # 7: every native voxel labelled as the new nodule is pasted with weight 1 (interpolated, rim voxels kept 5-15 %
    # of the source's HU); a hard paste (feather_mm 0) rounds halfway voxels up, not to even
    # 8: the native label map's fine-grid lookup rounds ties up (to even, a lung slab's extent depended on parity)
    "synthesize_lesion": 8,
    # 2: its bank nodules rescaled as sample 3 and 4 (the bounding box's grid, never split, boundary probes); 3: as
    # synthesize_lesion 5 (RePaint's jumps); 4: a model that learnt no class (own images) is asked "any" once,
    # beside every real nodule, not the three classes it never saw
    "lesion_texture": 4,
    # 2: halves and bootstraps by patient, not by nodule; 3: no interval where a set is one patient's (the excess's
    # and the size-matched rows' had one), a synthetic nodule of a class a half lacks left out of the matched rows
    # 4: the margin profile reaches profile_mm in whole steps, never beyond (7 mm in 2 mm steps reached 8 mm; the
    # demo's 5 mm in 1.25 mm steps is unchanged)
    # 5: profiles.png draws the real nodules as the table's halves A and B (it drew them all)
    # 6: a class with synthetic nodules and no real one has a row of their own statistics (n_b 0), and it is said
    "lesion_fidelity": 6,
}


def output_version(stage: str) -> dict[str, int]:
    """``{"version": n}`` for stage ``stage`` (a rule's name) at version n > 1, ``{}`` at 1: what a rule's params
    and a stage's reuse keys add. An unknown stage is an error (a rule without an entry would never rerun)."""
    try:
        n = OUTPUT_VERSIONS[stage]
    except KeyError:
        raise LungDDPMError(
            f"no output version for the stage {stage!r}; add it to lungddpm.versions.OUTPUT_VERSIONS"
        ) from None
    return {} if n == 1 else {"version": n}
