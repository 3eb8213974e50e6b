"""Snakemake adapter: lesion-scale ROIs of one case (lungddpm.preprocessing.rois.extract_rois)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.logs import rule_logging
from lungddpm.preprocessing.rois import RoiSettings, extract_rois, load_source

with rule_logging(snakemake.log[0]):
    cfg = config_from_mapping(snakemake.config)
    case = snakemake.wildcards.case
    src = load_source(case, Path(snakemake.input.lung_fine).parent, cfg)
    extract_rois(src, RoiSettings.from_config(cfg), Path(snakemake.output.table).parent)
