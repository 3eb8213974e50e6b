rule nodule_bank:
    output:
        bank="resources/nodule_bank.npz",
    params:
        cases=BANK_CASES,
        consensus_level=config["data"]["consensus_level"],
        clustering=CLUSTERING_VERSION,
        **output_version("nodule_bank"),
    log:
        "logs/nodule_bank.log",
    benchmark:
        "benchmarks/nodule_bank.tsv"
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/nodule_bank.py"


rule sample:
    input:
        unpack(sample_inputs),
    output:
        manifest="results/synthetic/{run}/shard_{shard}.json",
    params:
        shard_items=shard_items,
        settings=sample_settings,
        **output_version("sample"),
    log:
        "logs/sample/{run}_{shard}.log",
    benchmark:
        "benchmarks/sample/{run}_{shard}.tsv"
    threads: max(1, workflow.cores // config["sample"]["shards"])
    resources:
        mem_mb=6000,
        gpu=min(config["train"]["gpus"], 1),
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/sample.py"
