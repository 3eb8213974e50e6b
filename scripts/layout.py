"""Snakemake adapter: compose and check one semantic layout (lungddpm.layout.make_layout)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.layout import make_layout
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):
    make_layout(
        Path(snakemake.input.lung).parent,
        Path(snakemake.output.layout),
        config_from_mapping(snakemake.config).layout,
    )
