"""Snakemake adapter: train the diffusion model (lungddpm.diffusion.train.launch; torchrun when processes > 1)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.diffusion.train import launch, make_job
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    job = make_job(
        config_from_mapping(snakemake.config),
        inp.ct,
        inp.layouts,
        inp.val_ct,
        inp.val_layouts,
        Path(snakemake.output.checkpoint).parent,
        Path(snakemake.params.state_dir),
        snakemake.threads,
    )
    launch(job, snakemake.params.processes)
