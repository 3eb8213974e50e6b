"""Snakemake adapter: write one demo phantom series (lungddpm.data.demo.write_demo_case, which writes the manifest,
the rule's output, last)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.data.demo import manifest_path, write_demo_case
from lungddpm.logs import rule_logging

with rule_logging(snakemake.log[0]):
    case, output = snakemake.wildcards.case, snakemake.output
    root = Path(output.truth).parents[2]  # <root>/truth/<case>/lung.nii.gz
    assert Path(output.manifest) == manifest_path(root, case), (output.manifest, manifest_path(root, case))
    write_demo_case(case, root, config_from_mapping(snakemake.config))
