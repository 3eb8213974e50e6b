"""Snakemake adapter: compose and check one semantic layout (lungddpm.preprocessing.layout.make_layout)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.logs import rule_logging
from lungddpm.preprocessing.layout import make_layout

with rule_logging(snakemake.log[0]):
    make_layout(
        Path(snakemake.input.lung).parent,
        Path(snakemake.output.layout),
        config_from_mapping(snakemake.config).layout,
    )
