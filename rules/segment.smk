# Downstream evaluation: nnU-Net v2 nodule segmentation per arm (real, real+synthetic, ...), tested on the real
# test split, at segmentation.scale: lesion (ROIs) or whole (CTs on the model grid). One job prepares an arm and
# seed (dataset export, plan, preprocess), one trains each fold and predicts the test set, one scores each arm, one
# compares the arms; segment_sweep runs the synthetic_fraction sweep. nnU-Net's folders live under state/.
import re

from lungddpm.segmentation.arms import check_arms, segmentation_config

try:  # a segmentation key's problem: its message, without the parser's traceback (as rules/common.smk)
    SEG = segmentation_config(config)
except LungDDPMError as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
SEG_ARMS = SEG.arm_names
SEG_DIR = f"results/segmentation/{SEG.scale}"
SEG_TRAIN = subset_cases("train")
SEG_TEST = subset_cases("test")
SEG_AUGMENT = expand("results/synthetic/augment/shard_{shard}.json", shard=range(N_SHARDS))
SEG_LESION = expand("results/synthetic/lesion/shard_{shard}.json", shard=range(LESION_SHARDS))
SEG_ARM_RE = "|".join(re.escape(a) for a in SEG_ARMS + SEG.sweep_names)
# the keys each rule depends on (editing one reruns exactly the rules that use it)
SEG_PLAN_KEYS = ("scale", "dataset_id", "configuration", "planner", "fingerprint_samples", "network")
SEG_TRAIN_KEYS = (
    "trainer",
    "num_epochs",
    "iterations_per_epoch",
    "val_iterations_per_epoch",
    "initial_lr",
    "cpu_precision",
)
SEG_PREDICT_KEYS = ("final_validation", "test_time_mirroring", "tile_step_size")
if SEG.enabled:
    try:
        seg_check_arms()
    except LungDDPMError as exc:
        sys.exit(f"{type(exc).__name__}: {exc}")


rule segment_prepare:
    input:
        unpack(seg_train_inputs),
    output:
        prepared=f"{SEG_DIR}/{{arm}}/seed{{seed}}/prepared.json",
    params:
        state_dir=lambda wildcards: f"state/segmentation/{SEG.scale}/{wildcards.arm}/seed{wildcards.seed}",
        arm=lambda wildcards: SEG.arm(wildcards.arm).params(),
        test_cases=SEG_TEST,
        patients={c: PATIENTS[c] for c in SEG_TRAIN},  # nnU-Net's 5 folds keep a patient's cases together
        settings={k: config["segmentation"][k] for k in SEG_PLAN_KEYS},
        **output_version("segment_prepare"),
    wildcard_constraints:
        arm=SEG_ARM_RE,
        seed=r"\d+",
    log:
        "logs/segment_prepare/{arm}_seed{seed}.log",
    benchmark:
        "benchmarks/segment_prepare/{arm}_seed{seed}.tsv"
    # above segment_train: both arms prepare before either trains, then they train side by side (demo: 2 x 1 core);
    # at equal priority one arm's training plus a 1-core job tied with the other arm's 2-core prepare
    priority: 6
    threads: SEG.job_threads("prepare", workflow.cores)
    resources:
        mem_mb=4000,
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/segment_prepare.py"


rule segment_train:
    input:
        unpack(seg_test_inputs),
        prepared=f"{SEG_DIR}/{{arm}}/seed{{seed}}/prepared.json",
    output:
        predictions=directory(f"{SEG_DIR}/{{arm}}/seed{{seed}}/fold_{{fold}}/predictions"),
        run=f"{SEG_DIR}/{{arm}}/seed{{seed}}/fold_{{fold}}/run.json",
    params:
        settings={k: config["segmentation"][k] for k in SEG_TRAIN_KEYS + SEG_PREDICT_KEYS},
        **output_version("segment_train"),
    wildcard_constraints:
        arm=SEG_ARM_RE,
        seed=r"\d+",
        fold=r"all|\d",
    log:
        "logs/segment_train/{arm}_seed{seed}_fold{fold}.log",
    benchmark:
        "benchmarks/segment_train/{arm}_seed{seed}_fold{fold}.tsv"
    priority: 5
    threads: SEG.job_threads("train", workflow.cores)
    resources:
        mem_mb=8000,
        gpu=SEG.gpus,
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/segment_train.py"


rule segment_score:
    input:
        unpack(seg_test_inputs),
        runs=expand(f"{SEG_DIR}/{{{{arm}}}}/seed{{seed}}/fold_{{fold}}/run.json", seed=SEG.seeds, fold=SEG.folds),
    output:
        scores=report(
            f"{SEG_DIR}/{{arm}}/scores.csv",
            category="Segmentation",
            subcategory="{arm}",
            caption="../report/segmentation_scores.rst",
        ),
    params:
        settings=config["segmentation"]["evaluation"],
        patients={c: PATIENTS[c] for c in SEG_TEST},  # the independent unit of the whole scale (and lesion, by patient)
        **output_version("segment_score"),
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
        scores=expand(f"{SEG_DIR}/{{arm}}/scores.csv", arm=SEG_ARMS),
    output:
        table=report(
            f"{SEG_DIR}/comparison.csv",
            category="Segmentation",
            caption="../report/segmentation_comparison.rst",
        ),
        plot=report(
            f"{SEG_DIR}/comparison.png",
            category="Segmentation",
            caption="../report/segmentation_comparison_plot.rst",
        ),
    params:
        arms=SEG_ARMS,
        settings={k: config["segmentation"][k] for k in ("baseline", "evaluation")},
        **output_version("segment_compare"),
    log:
        "logs/segment_compare.log",
    benchmark:
        "benchmarks/segment_compare.tsv"
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/segment_compare.py"


rule segment_sweep:
    input:
        scores=expand(f"{SEG_DIR}/{{arm}}/scores.csv", arm=SEG.sweep_names),
    output:
        table=report(f"{SEG_DIR}/sweep.csv", category="Segmentation", caption="../report/segmentation_sweep.rst"),
        plot=report(f"{SEG_DIR}/sweep.png", category="Segmentation", caption="../report/segmentation_sweep.rst"),
    params:
        fractions=[a.synthetic_fraction for a in SEG.sweep],
        settings={k: config["segmentation"][k] for k in ("sweep", "evaluation")},
        **output_version("segment_sweep"),
    log:
        "logs/segment_sweep.log",
    benchmark:
        "benchmarks/segment_sweep.tsv"
    conda:
        "../envs/lungddpm.yaml"
    script:
        "../scripts/segment_sweep.py"
