"""Snakemake adapter: the lesion model's texture-control check (lungddpm.synthesis.lesion_run.texture_control)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.logs import rule_logging
from lungddpm.synthesis.lesion_run import texture_control

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    texture_control(
        config_from_mapping(snakemake.config),
        Path(inp.checkpoint),
        [Path(p) for p in inp.tables],
        Path(inp.bank),
        Path(snakemake.output.table),
        snakemake.params.sites,
        snakemake.threads,
    )
