rule train:
    input:
        ct=expand("results/preprocessed/{case}/ct.nii.gz", case=subset_cases("train")),
        layouts=expand("results/layouts/{case}.nii.gz", case=subset_cases("train")),
        val_ct=expand("results/preprocessed/{case}/ct.nii.gz", case=subset_cases("val")),
        val_layouts=expand("results/layouts/{case}.nii.gz", case=subset_cases("val")),
        splits="results/splits.csv",
    output:
        checkpoint="results/models/{name}/checkpoint.pt",
        train_log=report("results/models/{name}/train_log.csv", category="Training", caption="../report/train_log.rst"),
        preview=report("results/models/{name}/preview.png", category="Training", caption="../report/preview.rst"),
    params:
        state_dir=lambda wildcards: f"state/models/{wildcards.name}",
        settings=settings("model", "diffusion", "train", "intensity"),
        **output_version("train"),
    wildcard_constraints:
        name=re.escape(MODEL),  # only this config's model: a checkpoint given in sample.checkpoint is never retrained
    log:
        "logs/train/{name}.log",
    benchmark:
        "benchmarks/train/{name}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        gpu=config["train"]["gpus"],
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/train.py"
