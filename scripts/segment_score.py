"""Snakemake adapter: score one arm's test predictions (lungddpm.segmentation.evaluate.score_arm)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.segmentation.arms import segmentation_config
from lungddpm.segmentation.evaluate import score_arm

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    nodules = {Path(n).parent.name: Path(n) for n in inp.nodules}
    evaluation = segmentation_config(snakemake.config).evaluation
    score_arm(snakemake.wildcards.arm, [Path(r) for r in inp.runs], nodules, Path(snakemake.output.scores), evaluation)
