rule demo_dicom:
    output:
        manifest=f"{DEMO_ROOT}/series/{{case}}.json",
        truth=f"{DEMO_ROOT}/truth/{{case}}/lung.nii.gz",
    params:
        index=lambda wildcards: CASES.index(wildcards.case),
        settings=settings("data"),
    log:
        "logs/demo_dicom/{case}.log",
    benchmark:
        "benchmarks/demo_dicom/{case}.tsv"
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/demo_dicom.py"


rule split:
    output:
        splits=report("results/splits.csv", category="Data", caption="../report/splits.rst"),
    params:
        cases=CASES,
        settings=settings("data", "split"),
    log:
        "logs/split.log",
    benchmark:
        "benchmarks/split.tsv"
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/split.py"


rule demo_qc:
    input:
        meta=expand("results/preprocessed/{case}/meta.json", case=CASES),
        truth=expand(f"{DEMO_ROOT}/truth/{{case}}/lung.nii.gz", case=CASES),
    output:
        qc=report("results/qc/demo_segmentation.csv", category="Data", caption="../report/demo_qc.rst"),
    params:
        cases=CASES,
    log:
        "logs/demo_qc.log",
    benchmark:
        "benchmarks/demo_qc.tsv"
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/demo_qc.py"
