"""Snakemake adapter: train the lesion model on the train ROIs (lungddpm.diffusion.jobs.run_job, scale lesion)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.diffusion.jobs import make_job, run_job
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    cfg = config_from_mapping(snakemake.config)
    out, state = Path(snakemake.output.checkpoint).parent, Path(snakemake.params.state_dir)
    run_job(make_job(cfg, inp.tables, [], inp.val_tables, [], out, state, snakemake.threads, scale="lesion"))
