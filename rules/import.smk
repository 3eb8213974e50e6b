# model.init_from: a released Lung-DDPM checkpoint becomes results/models/<name>/checkpoint.pt instead of training.
from pathlib import Path


if config["model"]["init_from"]:  # a problem is one message, without the parser's traceback (as in common.smk)
    if not Path(config["model"]["init_from"]).is_file():
        sys.exit(
            f"ConfigError: model.init_from: {config['model']['init_from']} is not a file (relative paths start at the "
            "working directory); point it at the released Lung-DDPM checkpoint, e.g. Lung-DDPM-LIDC-IDRI-100000-steps.pt"
        )
    if Path(f"results/models/{MODEL}/train_log.csv").is_file():
        sys.exit(
            f"ConfigError: model.init_from: results/models/{MODEL}/ holds a model trained here (train_log.csv), which "
            f"the import would overwrite; set train.name to another name (e.g. lung-ddpm-released), or delete that folder"
        )

    ruleorder: import_checkpoint > train

    rule import_checkpoint:
        input:
            source=config["model"]["init_from"],
        output:
            checkpoint="results/models/{name}/checkpoint.pt",
        params:
            # what the import reads of the config: the other model keys are the file's (a warning says where they differ)
            settings={"model": {k: config["model"][k] for k in ("num_heads", "norm_groups")},
                      "init_convention": config["init_convention"]},
            **output_version("import_checkpoint"),
        wildcard_constraints:
            name=re.escape(MODEL),  # train.name's only: never a sample.checkpoint of another model under results/
        log:
            "logs/import_checkpoint/{name}.log",
        benchmark:
            "benchmarks/import_checkpoint/{name}.tsv"
        resources:
            mem_mb=4000,
        conda:
            "../envs/lungddpm.yaml"
        script:
            "../scripts/import_checkpoint.py"
