"""Snakemake adapter: score one demo case's preprocessing against the phantom truth (lungddpm.data.demo.qc_case)."""

from pathlib import Path

from lungddpm.data.demo import qc_case
from lungddpm.io import write_json
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]) as log:
    row = qc_case(snakemake.wildcards.case, Path(snakemake.input.truth), Path(snakemake.input.meta).parent)
    log.info("%s", row)
    write_json(snakemake.output.qc, row)
