"""Snakemake adapter: preprocess one case (lungddpm.preprocessing.preprocess.preprocess_case)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.logs import rule_logging
from lungddpm.preprocessing.preprocess import preprocess_case

with rule_logging(snakemake.log[0]):
    preprocess_case(
        snakemake.wildcards.case,
        Path(snakemake.output.meta).parent,
        config_from_mapping(snakemake.config),
    )
