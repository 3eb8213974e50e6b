"""Snakemake adapter: train the lesion model on the train ROIs (lungddpm.diffusion.jobs.launch_training)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.diffusion.jobs import launch_training, make_job
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    cfg = config_from_mapping(snakemake.config)
    out, state = Path(snakemake.output.checkpoint).parent, Path(snakemake.params.state_dir)
    job = make_job(cfg, inp.tables, [], inp.val_tables, [], out, state, snakemake.threads, scale="lesion")
    launch_training(job, int(snakemake.resources.get("gpu", 0)))  # one process, on the GPU the job holds
