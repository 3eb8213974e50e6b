"""Snakemake adapter: image-quality metrics of the eval run (lungddpm.metrics.image_quality)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.metrics.image_quality import image_quality, workflow_sets

with rule_logging(snakemake.log[0]):
    inp, out, params, settings = snakemake.input, snakemake.output, snakemake.params, snakemake.config["metrics"]
    real = {case: (Path(ct), Path(lay)) for case, ct, lay in zip(params.cases, inp.ct, inp.layouts, strict=True)}
    pairs, reference, floor = workflow_sets(
        [Path(m) for m in inp.manifests], real, params.patients, settings["seed"], settings["floor_fraction"]
    )
    image_quality(
        pairs, reference, floor, settings, snakemake.config["intensity"]["hu_window"], Path(out.table),
        Path(out.per_case), Path(params.cache_dir), snakemake.threads,
    )  # fmt: skip
