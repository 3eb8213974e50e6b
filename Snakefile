# lungddpm: semantic-layout-guided 3D diffusion for thoracic CT synthesis, as a Snakemake workflow.
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


include: "rules/common.smk"


wildcard_constraints:
    case=r"[A-Za-z0-9][A-Za-z0-9._-]*",  # LIDC ids (LIDC-IDRI-0001_s2) and sanitised file stems (data.source images)
    run="eval|augment",
    shard=r"\d+",


include: "rules/data.smk"
include: "rules/preprocess.smk"
include: "rules/train.smk"
include: "rules/import.smk"
include: "rules/sample.smk"
include: "rules/metrics.smk"
include: "rules/report.smk"
include: "rules/segment.smk"
include: "rules/lesion.smk"


rule all:
    input:
        final_targets(),
    default_target: True
