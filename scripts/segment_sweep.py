"""Snakemake adapter: the synthetic_fraction sweep's table and plot (lungddpm.segmentation.evaluate.sweep)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.segmentation.arms import segmentation_config
from lungddpm.segmentation.evaluate import sweep

with rule_logging(snakemake.log[0]):
    out, cfg = snakemake.output, segmentation_config(snakemake.config)
    scores = {float(f): Path(p) for f, p in zip(snakemake.params.fractions, snakemake.input.scores)}
    sweep(scores, Path(out.table), Path(out.plot), cfg.evaluation, cfg.sweep[0].real_fraction)
