"""Snakemake adapter: the workflow report (lungddpm.report.summary.write_report)."""

from pathlib import Path

from lungddpm.logs import rule_logging
from lungddpm.report.summary import write_report
from lungddpm.segmentation.arms import segmentation_config


def optional(name: str) -> Path | None:
    return Path(getattr(snakemake.input, name)) if name in snakemake.input.keys() else None


with rule_logging(snakemake.log[0]):
    inp, out = snakemake.input, snakemake.output
    write_report(
        Path(out.summary), Path(inp.image_quality), optional("train_log"), [Path(m) for m in inp.manifests],
        Path(out.loss), Path(out.quality), Path(out.figures), snakemake.params.montages, snakemake.params.demo,
        optional("segmentation"), optional("segmentation_png"),
        [Path(m) for m in inp.get("lesion", [])], optional("lesion_texture"),
        optional("fidelity"), [p for p in (optional("fidelity_profiles"), optional("fidelity_gallery")) if p],
        cluster=segmentation_config(snakemake.config).evaluation.cluster,
    )  # fmt: skip
