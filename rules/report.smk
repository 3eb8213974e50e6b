rule report:
    input:
        unpack(report_inputs),
    output:
        summary=report("results/report/summary.md", category="Report", caption="../report/summary.rst"),
        loss=report("results/report/training_loss.png", category="Training", caption="../report/training_loss.rst"),
        quality=report(
            "results/report/image_quality.png", category="Image quality", caption="../report/image_quality_plot.rst"
        ),
        figures=report(
            directory("results/report/figures"),
            patterns=["{name}.png"],
            category="Samples",
            caption="../report/figures.rst",
        ),
    params:
        montages=config["report"]["montages"],
        demo=IS_DEMO,
        **output_version("report"),
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/report.py"
