"""Snakemake adapter: one shard of the lesion run (lungddpm.synthesis.lesion_run.synthesize_lesion_shard)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.io import write_json
from lungddpm.logs import rule_logging
from lungddpm.synthesis.lesion_run import synthesize_lesion_shard
from lungddpm.synthesis.plan import Item

with rule_logging(snakemake.log[0]):
    inp = snakemake.input
    manifest = synthesize_lesion_shard(
        [Item(**d) for d in snakemake.params.shard_items],
        config_from_mapping(snakemake.config),
        Path(inp.checkpoint),
        {Path(p).parent.name: Path(p) for p in inp.tables},
        {Path(p).parent.name: Path(p).parent for p in inp.lung_fine},
        Path(inp.bank),
        Path(snakemake.output.manifest).parent,
        snakemake.threads,
    )
    write_json(snakemake.output.manifest, {"run": "lesion", "items": manifest})
