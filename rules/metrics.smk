rule metrics:
    input:
        unpack(metrics_inputs),
    output:
        table=report(
            "results/metrics/eval/image_quality.csv", category="Image quality", caption="../report/image_quality.rst"
        ),
        per_case=report("results/metrics/eval/per_case.csv", category="Image quality", caption="../report/per_case.rst"),
    params:
        cases=sorted(SPLIT),
        patients=PATIENTS,
        cache_dir="state/feature_cache",
        settings=settings("metrics", "intensity"),
        **output_version("metrics"),
    log:
        "logs/metrics/eval.log",
    benchmark:
        "benchmarks/metrics/eval.tsv"
    threads: workflow.cores
    resources:
        mem_mb=6000,
        gpu=min(config["train"]["gpus"], 1),  # the feature network: the GPU when the models have one
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/metrics.py"
