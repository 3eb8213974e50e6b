"""Snakemake adapter: write one demo phantom series (lungddpm.data.demo.write_demo_case)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.data.demo import write_demo_case
from lungddpm.io import write_json
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):
    case, output = snakemake.wildcards.case, snakemake.output
    root = Path(output.truth).parents[2]  # <root>/truth/<case>/lung.nii.gz
    series = write_demo_case(case, root, config_from_mapping(snakemake.config))
    write_json(output.manifest, {"case_id": case, "series_dir": str(series)})
