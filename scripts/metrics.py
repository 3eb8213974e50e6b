"""Snakemake adapter: image-quality metrics of the eval run (lungddpm.metrics.image_quality)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.metrics.image_quality import image_quality, workflow_sets

with rule_logging(snakemake.log[0]):
    inp, out, cfg = snakemake.input, snakemake.output, snakemake.config
    real = {Path(c).parent.name: (Path(c), Path(lay)) for c, lay in zip(inp.ct, inp.layouts)}
    pairs, reference, floor = workflow_sets([Path(m) for m in inp.manifests], real, cfg["metrics"]["seed"])
    image_quality(
        pairs, reference, floor, cfg["metrics"], cfg["intensity"]["hu_window"], Path(out.table), Path(out.per_case),
        Path(snakemake.params.cache_dir), snakemake.threads,
    )  # fmt: skip
