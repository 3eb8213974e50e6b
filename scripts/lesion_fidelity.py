"""Snakemake adapter: lesion fidelity beside the real floor (lungddpm.metrics.lesion.lesion_fidelity)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.metrics.lesion import fidelity_settings, lesion_fidelity
from lungddpm.segmentation.datasets import lesion_outputs

with rule_logging(snakemake.log[0]):
    inp, out = snakemake.input, snakemake.output
    items = lesion_outputs([Path(m) for m in inp.manifests], "roi")
    settings = fidelity_settings(snakemake.config["lesion"])
    lesion_fidelity([Path(t) for t in inp.tables], items, settings, Path(out.table), Path(out.profiles),
                    Path(out.gallery), dict(snakemake.params.patients))  # fmt: skip
