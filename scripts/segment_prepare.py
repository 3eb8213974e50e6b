"""Snakemake adapter: export one arm's nnU-Net dataset, then plan and preprocess it (lungddpm.segmentation.nnunet)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.segmentation.arms import segmentation_config
from lungddpm.segmentation.nnunet import prepare_arm

with rule_logging(snakemake.log[0]):
    inp, params, cfg = snakemake.input, snakemake.params, segmentation_config(snakemake.config)
    real = {Path(ct).parent.name: (Path(ct), Path(lay)) for ct, lay in zip(inp.ct, inp.layouts)}
    augment = [Path(m) for m in inp.augment] if "augment" in inp.keys() else []
    prepare_arm(
        cfg.arm(snakemake.wildcards.arm), int(snakemake.wildcards.seed), real, augment, params.test_cases,
        Path(params.state_dir), Path(snakemake.output.prepared), cfg, snakemake.threads,
    )  # fmt: skip
