"""Snakemake adapter: gather the per-case demo QC into one table (lungddpm.data.demo.write_qc_table)."""

from pathlib import Path

from lungddpm.data.demo import write_qc_table
from lungddpm.io import read_json
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):
    write_qc_table([read_json(p) for p in snakemake.input.rows], Path(snakemake.output.table))
