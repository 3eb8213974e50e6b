"""Snakemake adapter: import a released Lung-DDPM checkpoint (lungddpm.diffusion.convert.import_from_config)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.diffusion.convert import import_from_config
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):
    import_from_config(
        config_from_mapping(snakemake.config), Path(snakemake.input.source), Path(snakemake.output.checkpoint)
    )
