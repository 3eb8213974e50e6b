# Downstream evaluation: nnU-Net v2 nodule segmentation per arm (real, real+synthetic, ...), tested on the real
# test split. One job prepares an arm and seed (dataset export, plan, preprocess), one trains each fold and
# predicts the test CTs, one scores each arm, one compares the arms. nnU-Net's folders live under state/.
import re
from dataclasses import asdict

from lungddpm.segmentation.arms import check_arms, segmentation_config

SEG = segmentation_config(config)
SEG_ARMS = SEG.arm_names
SEG_TRAIN = subset_cases("train")
SEG_TEST = subset_cases("test")
SEG_THREADS = workflow.cores if SEG.threads == 0 else min(SEG.threads, workflow.cores)
SEG_AUGMENT = expand("results/synthetic/augment/shard_{shard}.json", shard=range(N_SHARDS))
SEG_ARM_RE = "|".join(re.escape(a) for a in SEG_ARMS)
# the keys each rule depends on (editing one reruns exactly the rules that use it)
SEG_PLAN_KEYS = ("dataset_id", "configuration", "planner", "fingerprint_samples")
SEG_TRAIN_KEYS = ("trainer", "num_epochs", "iterations_per_epoch", "val_iterations_per_epoch", "initial_lr")
SEG_PREDICT_KEYS = ("final_validation", "test_time_mirroring", "tile_step_size")
if SEG.enabled:
    check_arms(SEG, len(SEG_TRAIN), len(run_items("augment")), len(SEG_TEST))


rule segment_prepare:
    input:
        ct=expand("results/preprocessed/{case}/ct.nii.gz", case=SEG_TRAIN),
        layouts=expand("results/layouts/{case}.nii.gz", case=SEG_TRAIN),
        augment=lambda wildcards: SEG_AUGMENT if SEG.arm(wildcards.arm).synthetic_fraction > 0 else [],
    output:
        prepared="results/segmentation/{arm}/seed{seed}/prepared.json",
    params:
        state_dir=lambda wildcards: f"state/segmentation/{wildcards.arm}/seed{wildcards.seed}",
        arm=lambda wildcards: asdict(SEG.arm(wildcards.arm)),
        test_cases=SEG_TEST,
        settings={k: config["segmentation"][k] for k in SEG_PLAN_KEYS},
    wildcard_constraints:
        arm=SEG_ARM_RE,
        seed=r"\d+",
    log:
        "logs/segment_prepare/{arm}_seed{seed}.log",
    benchmark:
        "benchmarks/segment_prepare/{arm}_seed{seed}.tsv"
    threads: min(SEG.processes, workflow.cores)
    resources:
        mem_mb=4000,
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/segment_prepare.py"


rule segment_train:
    input:
        prepared="results/segmentation/{arm}/seed{seed}/prepared.json",
        ct=expand("results/preprocessed/{case}/ct.nii.gz", case=SEG_TEST),
    output:
        predictions=expand(
            "results/segmentation/{{arm}}/seed{{seed}}/fold_{{fold}}/predictions/{case}.nii.gz", case=SEG_TEST
        ),
        run="results/segmentation/{arm}/seed{seed}/fold_{fold}/run.json",
    params:
        settings={k: config["segmentation"][k] for k in SEG_TRAIN_KEYS + SEG_PREDICT_KEYS},
    wildcard_constraints:
        arm=SEG_ARM_RE,
        seed=r"\d+",
        fold=r"all|\d",
    log:
        "logs/segment_train/{arm}_seed{seed}_fold{fold}.log",
    benchmark:
        "benchmarks/segment_train/{arm}_seed{seed}_fold{fold}.tsv"
    threads: SEG_THREADS
    resources:
        mem_mb=8000,
        gpu=SEG.gpus,
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/segment_train.py"


rule segment_score:
    input:
        runs=expand("results/segmentation/{{arm}}/seed{seed}/fold_{fold}/run.json", seed=SEG.seeds, fold=SEG.folds),
        nodules=expand("results/preprocessed/{case}/nodules.nii.gz", case=SEG_TEST),
    output:
        scores=report(
            "results/segmentation/{arm}/scores.csv",
            category="Segmentation",
            subcategory="{arm}",
            caption="../report/segmentation_scores.rst",
        ),
    params:
        settings=config["segmentation"]["evaluation"],
    wildcard_constraints:
        arm=SEG_ARM_RE,
    log:
        "logs/segment_score/{arm}.log",
    benchmark:
        "benchmarks/segment_score/{arm}.tsv"
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/segment_score.py"


rule segment_compare:
    input:
        scores=expand("results/segmentation/{arm}/scores.csv", arm=SEG_ARMS),
    output:
        table=report(
            "results/segmentation/comparison.csv",
            category="Segmentation",
            caption="../report/segmentation_comparison.rst",
        ),
        plot=report(
            "results/segmentation/comparison.png",
            category="Segmentation",
            caption="../report/segmentation_comparison_plot.rst",
        ),
    params:
        arms=SEG_ARMS,
        settings={k: config["segmentation"][k] for k in ("baseline", "evaluation")},
    log:
        "logs/segment_compare.log",
    benchmark:
        "benchmarks/segment_compare.tsv"
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/segment_compare.py"
