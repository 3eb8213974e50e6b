"""Snakemake adapter: write one demo phantom series (lungddpm.data.demo.write_demo_case)."""
from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.data.demo import write_demo_case
from lungddpm.io import write_json
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):  # noqa: F821
    series = write_demo_case(snakemake.wildcards.case, snakemake.params.index, Path(snakemake.params.root),  # noqa: F821
                             config_from_mapping(snakemake.config))  # noqa: F821
    write_json(snakemake.output.manifest, {"case_id": snakemake.wildcards.case, "series_dir": str(series)})  # noqa: F821
