"""Snakemake adapter: export one arm's nnU-Net dataset, then plan and preprocess it (lungddpm.segmentation.nnunet)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.segmentation.arms import segmentation_config
from lungddpm.segmentation.datasets import arm_cases
from lungddpm.segmentation.nnunet import prepare_arm

with rule_logging(snakemake.log[0]):
    params, cfg, seed = snakemake.params, segmentation_config(snakemake.config), int(snakemake.wildcards.seed)
    arm = cfg.arm(snakemake.wildcards.arm)
    cases = arm_cases(cfg.scale, arm, seed, dict(snakemake.input.items()), params.test_cases)
    prepare_arm(arm, seed, cases, params.test_cases, Path(params.state_dir), Path(snakemake.output.prepared), cfg,
                snakemake.threads, params.patients)  # fmt: skip
