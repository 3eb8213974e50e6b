"""Snakemake adapter: compare the arms against the baseline (lungddpm.segmentation.evaluate.compare_arms)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.segmentation.arms import segmentation_config
from lungddpm.segmentation.evaluate import compare_arms

with rule_logging(snakemake.log[0]):
    out, cfg = snakemake.output, segmentation_config(snakemake.config)
    scores = {arm: Path(p) for arm, p in zip(snakemake.params.arms, snakemake.input.scores)}
    compare_arms(scores, cfg.baseline, Path(out.table), Path(out.plot), cfg.evaluation)
