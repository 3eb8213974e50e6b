"""Snakemake adapter: train the diffusion model (lungddpm.diffusion.jobs.launch_training; torchrun for several)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.diffusion.jobs import launch_training, make_job
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
    # one torchrun rank per GPU when the job holds several (e.g. a Slurm job with --gpus=N)
    launch_training(job, int(snakemake.resources.get("gpu", 0)), snakemake.config["train"]["processes"])
