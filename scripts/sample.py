"""Snakemake adapter: sample one shard of a run (lungddpm.synthesis.volume_run.synthesize_shard)."""

from pathlib import Path

from lungddpm.config import config_from_mapping
from lungddpm.io import write_json
from lungddpm.logs import rule_logging
from lungddpm.synthesis.volume_run import Item, synthesize_shard

with rule_logging(snakemake.log[0]):
    inp, run = snakemake.input, snakemake.wildcards.run
    items = [Item(**d) for d in snakemake.params.shard_items]
    manifest = synthesize_shard(
        run,
        items,
        config_from_mapping(snakemake.config),
        Path(inp.checkpoint),
        {Path(p).parent.name: Path(p) for p in inp.ct},
        {Path(p).name.removesuffix(".nii.gz"): Path(p) for p in inp.layouts},
        Path(snakemake.output.manifest).parent,
        Path(inp.bank) if "bank" in inp.keys() else None,
        snakemake.threads,
    )
    write_json(snakemake.output.manifest, {"run": run, "items": manifest})
