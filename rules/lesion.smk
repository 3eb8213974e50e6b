# The lesion scale (DESIGN §5): ROIs from the source CT at native resolution, a texture-conditioned lesion model
# on the train ROIs, nodules inpainted into nodule-free train ROIs and pasted back into the full CTs.


rule rois:
    input:
        unpack(series_input),
        lung_fine="results/preprocessed/{case}/lung_fine.nii.gz",
        meta="results/preprocessed/{case}/meta.json",
    output:
        table=report("results/rois/{case}/rois.csv", category="Lesion scale", subcategory="ROIs", caption="../report/rois.rst"),
    params:
        settings={**settings("data", "preprocess", case=True), "roi": config["lesion"]["roi"]},
        **output_version("rois"),
    priority: 10
    log:
        "logs/rois/{case}.log",
    benchmark:
        "benchmarks/rois/{case}.tsv"
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/rois.py"


rule train_lesion:
    input:
        tables=expand("results/rois/{case}/rois.csv", case=subset_cases("train")),
        val_tables=expand("results/rois/{case}/rois.csv", case=subset_cases("val")),
    output:
        checkpoint="results/models/lesion/{name}/checkpoint.pt",
        train_log=report("results/models/lesion/{name}/train_log.csv", category="Lesion scale", caption="../report/train_log.rst"),
        preview=report("results/models/lesion/{name}/preview.png", category="Lesion scale", caption="../report/preview.rst"),
    params:
        state_dir=lambda wildcards: f"state/models/lesion/{wildcards.name}",
        # the merged lesion view it trains with, not the whole-volume sections: train.steps alone does not retrain it
        settings={**lesion_training_settings(LESION_CFG), **lesion_settings("roi", "texture_hu"), **context_margin()},
        **output_version("train_lesion"),
    wildcard_constraints:
        name=re.escape(LESION_CFG.train.name),  # only this config's lesion model
    priority: 10  # the lesion chain (train, inpaint, segment) is the demo's critical path: start it first
    log:
        "logs/train_lesion/{name}.log",
    benchmark:
        "benchmarks/train_lesion/{name}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=6000,
        gpu=LESION_GPU,
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/train_lesion.py"


rule synthesize_lesion:
    input:
        unpack(lesion_inputs),
    output:
        manifest="results/synthetic/lesion/shard_{shard}.json",
    params:
        shard_items=lesion_shard_items,
        settings={**settings("data", "preprocess", case=True), **lesion_settings("insert", "sample")},  # the window: the checkpoint's
        **output_version("synthesize_lesion"),
    priority: 10
    log:
        "logs/synthesize_lesion/{shard}.log",
    benchmark:
        "benchmarks/synthesize_lesion/{shard}.tsv"
    threads: max(1, workflow.cores // config["lesion"]["sample"]["shards"])
    resources:
        mem_mb=4000,
        gpu=LESION_GPU,
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/synthesize_lesion.py"


rule lesion_texture:
    input:
        checkpoint=LESION_CHECKPOINT,
        tables=expand("results/rois/{case}/rois.csv", case=subset_cases("train")),
        bank="resources/nodule_bank.npz",
    output:
        table=report("results/synthetic/lesion/texture_control.csv", category="Lesion scale", caption="../report/texture_control.rst"),
    params:
        sites=config["lesion"]["texture_control_sites"],
        # the bank nodules' label fraction where not the default (outputs made before labelled them at 0.5)
        settings={**lesion_settings("sample"), "lesion.insert": texture_insert(),
                  **without_later_defaults({"nodule_fraction": config["lesion"]["roi"]["nodule_fraction"]})},
        **output_version("lesion_texture"),
    log:
        "logs/lesion_texture.log",
    benchmark:
        "benchmarks/lesion_texture.tsv"
    threads: workflow.cores
    resources:
        mem_mb=4000,
        gpu=LESION_GPU,  # it inpaints: the GPU when the models have one
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/lesion_texture.py"


rule lesion_fidelity:
    input:
        tables=expand("results/rois/{case}/rois.csv", case=CASES),
        manifests=expand("results/synthetic/lesion/shard_{shard}.json", shard=range(LESION_SHARDS)),
    output:
        table=report("results/metrics/lesion/fidelity.csv", category="Lesion scale", caption="../report/lesion_fidelity.rst"),
        profiles=report("results/metrics/lesion/profiles.png", category="Lesion scale", caption="../report/lesion_profiles.rst"),
        gallery=report("results/metrics/lesion/gallery.png", category="Lesion scale", caption="../report/lesion_gallery.rst"),
    params:
        settings=lesion_settings("fidelity", "texture_hu"),
        patients=PATIENTS,  # the independent unit of the floor's halves and the bootstraps
        **output_version("lesion_fidelity"),
    log:
        "logs/lesion_fidelity.log",
    benchmark:
        "benchmarks/lesion_fidelity.tsv"
    threads: 1
    resources:
        mem_mb=3000,
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/lesion_fidelity.py"
