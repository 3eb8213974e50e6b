"""Snakemake adapter: train one nnU-Net fold of an arm and predict the test split (lungddpm.segmentation.nnunet)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.segmentation.arms import segmentation_config
from lungddpm.segmentation.nnunet import train_arm

with rule_logging(snakemake.log[0]):
    inp, out = snakemake.input, snakemake.output
    test_cts = {Path(ct).parent.name: Path(ct) for ct in inp.ct}
    predictions = {Path(p).name.removesuffix(".nii.gz"): Path(p) for p in out.predictions}
    train_arm(
        Path(inp.prepared), snakemake.wildcards.fold, test_cts, predictions, Path(out.run),
        segmentation_config(snakemake.config), snakemake.threads,
    )  # fmt: skip
