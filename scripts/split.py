"""Snakemake adapter: write the patient-level split (lungddpm.cases.write_case_split)."""

from pathlib import Path

from lungddpm.cases import write_case_split
from lungddpm.config import config_from_mapping
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):
    write_case_split(config_from_mapping(snakemake.config), Path(snakemake.output.splits))
