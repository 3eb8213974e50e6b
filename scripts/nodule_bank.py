"""Snakemake adapter: build the nodule bank (lungddpm.synthesis.layout_edit.build_nodule_bank)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.synthesis.layout_edit import build_nodule_bank, save_bank

with rule_logging(snakemake.log[0]) as log:
    bank = build_nodule_bank(snakemake.params.cases, snakemake.params.consensus_level)
    log.info("nodule bank: %d nodules from %d scans", len(bank), len(snakemake.params.cases))
    save_bank(bank, Path(snakemake.output.bank))
