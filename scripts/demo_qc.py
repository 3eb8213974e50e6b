"""Snakemake adapter: score the demo's preprocessing against the phantom truth (lungddpm.data.demo.demo_qc)."""
from pathlib import Path

from lungddpm.cases import list_cases
from lungddpm.config import config_from_mapping
from lungddpm.data.demo import demo_qc
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):  # noqa: F821
    demo_qc(list_cases(config_from_mapping(snakemake.config)), Path(snakemake.params.root),  # noqa: F821
            Path(snakemake.params.preprocessed), Path(snakemake.output.qc))  # noqa: F821
