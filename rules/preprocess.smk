rule preprocess:
    input:
        unpack(series_input),
    output:
        ct="results/preprocessed/{case}/ct.nii.gz",
        lung="results/preprocessed/{case}/lung.nii.gz",
        nodules="results/preprocessed/{case}/nodules.nii.gz",
        lung_fine="results/preprocessed/{case}/lung_fine.nii.gz",
        meta="results/preprocessed/{case}/meta.json",
    params:
        settings=settings("data", "preprocess", "lungmask", case=True),
        sources=source_stamps,
        **output_version("preprocess"),
    log:
        "logs/preprocess/{case}.log",
    benchmark:
        "benchmarks/preprocess/{case}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/preprocess.py"


rule layout:
    input:
        lung="results/preprocessed/{case}/lung.nii.gz",
        nodules="results/preprocessed/{case}/nodules.nii.gz",
        meta="results/preprocessed/{case}/meta.json",
    output:
        layout="results/layouts/{case}.nii.gz",
    params:
        **output_version("layout"),  # the layout.* keys only refuse a layout (scripts/layout.py reads them)
    log:
        "logs/layout/{case}.log",
    benchmark:
        "benchmarks/layout/{case}.tsv"
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/layout.py"
