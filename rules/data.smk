rule demo_dicom:
    output:
        manifest=f"{DEMO_ROOT}/series/{{case}}.json",
        truth=f"{DEMO_ROOT}/truth/{{case}}/lung.nii.gz",
    params:
        # not which cases there are (demo.n_scans: a new one reruns no other), nor data.min_readers (every reader's
        # nodule is painted)
        settings=settings("data", case=True, unread=("min_readers",)),
        phantom=PHANTOM_VERSION,
        **output_version("demo_dicom"),
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
        settings=settings("data", "split"),  # a split moved by a label-map edit is refused at parse time (common.smk)
        **output_version("split"),
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
        meta="results/preprocessed/{case}/meta.json",
        lung_fine="results/preprocessed/{case}/lung_fine.nii.gz",
        nodules="results/preprocessed/{case}/nodules.nii.gz",
        truth=f"{DEMO_ROOT}/truth/{{case}}/lung.nii.gz",
    output:
        qc="results/qc/demo/{case}.json",
    params:
        **output_version("demo_qc"),
    log:
        "logs/demo_qc/{case}.log",
    benchmark:
        "benchmarks/demo_qc/{case}.tsv"
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/demo_qc.py"


rule demo_qc_table:
    input:
        rows=expand("results/qc/demo/{case}.json", case=CASES),
    output:
        table=report("results/qc/demo_segmentation.csv", category="Data", caption="../report/demo_qc.rst"),
    params:
        **output_version("demo_qc_table"),
    log:
        "logs/demo_qc_table.log",
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/demo_qc_table.py"
