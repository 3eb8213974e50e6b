"""Snakemake adapter: score the demo's preprocessing against the phantom truth (lungddpm.data.demo.demo_qc)."""

from pathlib import Path

from lungddpm.data.demo import demo_qc
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):
    inputs = snakemake.input
    demo_qc(
        snakemake.params.cases,
        list(inputs.truth),
        [Path(m).parent for m in inputs.meta],
        Path(snakemake.output.qc),
    )
