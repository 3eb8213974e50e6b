"""Snakemake adapter: write the patient-level split (lungddpm.preprocessing.cases.write_case_split)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.logs import rule_logging
from lungddpm.preprocessing.cases import write_case_split

with rule_logging(snakemake.log[0]):
    write_case_split(config_from_mapping(snakemake.config), Path(snakemake.output.splits))
