"""Snakemake adapter: train one nnU-Net fold of an arm and predict the test set (lungddpm.segmentation.nnunet)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.segmentation.arms import segmentation_config
from lungddpm.segmentation.datasets import eval_set
from lungddpm.segmentation.nnunet import train_arm

with rule_logging(snakemake.log[0]):
    out, cfg = snakemake.output, segmentation_config(snakemake.config)
    tests = eval_set(cfg.scale, dict(snakemake.input.items()))
    prepared, fold = Path(snakemake.input.prepared), snakemake.wildcards.fold
    train_arm(prepared, fold, tests, Path(out.predictions), Path(out.run), cfg, snakemake.threads)
