"""Snakemake adapter: score one arm's test predictions (lungddpm.segmentation.evaluate.score_arm)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.segmentation.arms import segmentation_config
from lungddpm.segmentation.datasets import eval_set
from lungddpm.segmentation.evaluate import score_arm

with rule_logging(snakemake.log[0]):
    cfg = segmentation_config(snakemake.config)
    tests = eval_set(cfg.scale, dict(snakemake.input.items()), snakemake.params.patients, cfg.evaluation.cluster)
    runs = [Path(r) for r in snakemake.input.runs]
    score_arm(snakemake.wildcards.arm, runs, tests, Path(snakemake.output.scores), cfg.evaluation)
