"""``lungddpm <stage>``: the same library functions the Snakemake rules call, from a shell."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .errors import LungDDPMError
from .logs import setup_logging

log = logging.getLogger("lungddpm")


def _positive(text: str) -> int:  # an argparse type
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _batch(text: str) -> int:  # an argparse type: a batch size, or max (0: the largest that fits)
    if text.strip() == "max":
        return 0
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number >= 1 nor max")
    return int(text)


def _config(args: argparse.Namespace):
    """The config as Snakemake sees it: ``--configfile`` merged over the workflow's config/config.yaml (the
    Snakefile's ``configfile:``, in ``--workdir`` if any) when that exists and is another file, then ``--set``."""
    from .config import lesion_config, load_config, set_overrides

    workdir = getattr(args, "workdir", None) or "."
    base = Path(workdir, "config", "config.yaml")
    if workdir != "." and not base.is_file() and not args.configfile:  # not the config of the cwd's workflow instead
        raise LungDDPMError(f"--workdir {workdir}: no config/config.yaml there; give the folder you ran snakemake in")
    path = Path(args.configfile or (base if base.is_file() else "config/config.yaml"))
    if merge := base.is_file() and not (path.exists() and path.samefile(base)):
        log.info("config: %s merged over %s", path, base)
    elif args.configfile and not base.is_file():  # not what Snakemake would run: its defaults are the workflow's
        log.warning("config: %s alone, the schema's defaults for the rest: no %s here (run from the workflow's "
                    "folder for the settings Snakemake uses)", path, base)  # fmt: skip
    cfg = load_config(path, set_overrides(args.set), base=base if merge else None)
    lesion_config(cfg)  # its keys are checked as Snakemake checks them at parse time
    return cfg


def cmd_cases(args: argparse.Namespace) -> None:
    from .preprocessing.cases import case_split, list_cases

    cfg = _config(args)
    cases = list_cases(cfg)
    split = case_split(cfg, cases)
    print(json.dumps({c: split[c] for c in cases}, indent=2))


def cmd_rois(args: argparse.Namespace) -> None:
    from .preprocessing.rois import RoiSettings, extract_rois, load_source

    cfg = _config(args)
    pre = Path(args.preprocessed or f"results/preprocessed/{args.case}")
    rows = extract_rois(load_source(args.case, pre, cfg), RoiSettings.from_config(cfg), Path(args.out))
    print(json.dumps({"case": args.case, "rois": len(rows), "table": str(Path(args.out) / "rois.csv")}))


def cmd_demo_dicom(args: argparse.Namespace) -> None:
    from .data.demo import write_demo_case
    from .data.sources import DEMO_ROOT
    from .preprocessing.cases import list_cases

    cfg = _config(args)
    cases = list_cases(cfg)
    todo = args.case or cases
    if unknown := [case for case in todo if case not in cases]:  # all checked before any series is written
        raise LungDDPMError(f"--case {', '.join(unknown)}: not one of the demo cases {cases}")
    for case in tqdm(todo, desc="demo series", unit="scan"):
        write_demo_case(case, Path(args.root or DEMO_ROOT), cfg)


def cmd_demo_images(args: argparse.Namespace) -> None:
    from .data.demo import export_demo_images
    from .data.sources import DEMO_ROOT
    from .preprocessing.cases import list_cases

    cfg = _config(args)
    cases = list_cases(cfg)
    files = export_demo_images(cfg, cases, Path(args.root or DEMO_ROOT), Path(args.out), args.format)
    out = Path(args.out)
    print(json.dumps({"ct_dir": str(out / "CT"), "label_dir": str(out / "SEG"), "cases": len(files)}))


def cmd_preprocess(args: argparse.Namespace) -> None:
    from .preprocessing.preprocess import preprocess_case

    cfg = _config(args)
    preprocess_case(args.case, Path(args.out), cfg)


def cmd_layout(args: argparse.Namespace) -> None:
    from .preprocessing.layout import make_layout

    make_layout(Path(args.case_dir), Path(args.out), _config(args).layout)


def cmd_split(args: argparse.Namespace) -> None:
    from .preprocessing.cases import write_case_split

    write_case_split(_config(args), Path(args.out))


def cmd_demo_qc(args: argparse.Namespace) -> None:
    from .data.demo import qc_case, truth_path, write_qc_table
    from .data.sources import DEMO_ROOT
    from .preprocessing.cases import list_cases

    root = Path(args.root or DEMO_ROOT)
    cases = list_cases(_config(args))
    write_qc_table([qc_case(c, truth_path(root, c), Path(args.preprocessed) / c) for c in cases], Path(args.out))


def cmd_train(args: argparse.Namespace) -> None:
    from .diffusion.jobs import launch_training, make_job
    from .preprocessing.cases import case_ct, case_layout, case_split, list_cases

    cfg = _config(args)
    split = case_split(cfg, list_cases(cfg))
    res = Path(args.results)
    subset = {s: sorted(c for c, v in split.items() if v == s) for s in ("train", "val")}
    job = make_job(
        cfg,
        [case_ct(res, c) for c in subset["train"]],
        [case_layout(res, c) for c in subset["train"]],
        [case_ct(res, c) for c in subset["val"]],
        [case_layout(res, c) for c in subset["val"]],
        res / "models" / cfg.train.name,
        Path(args.state) / "models" / cfg.train.name,
        args.threads,
    )
    launch_training(job, cfg.train.gpus, cfg.train.processes)


def cmd_train_job(args: argparse.Namespace) -> None:
    from .diffusion.jobs import read_job, run_job

    run_job(read_job(Path(args.job)))


def cmd_import_lungddpm(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from .diffusion.convert import import_from_config

    summary = import_from_config(_config(args), Path(args.checkpoint), Path(args.out))
    print(json.dumps({**asdict(summary), "out": args.out}, indent=2))


def cmd_nodule_bank(args: argparse.Namespace) -> None:
    from .preprocessing.cases import bank_cases, case_split, list_cases
    from .synthesis.layout_edit import build_nodule_bank, save_bank

    cfg = _config(args)
    cases = bank_cases(cfg, case_split(cfg, list_cases(cfg)))
    bank = build_nodule_bank(cases, cfg.data.consensus_level)
    save_bank(bank, Path(args.out))
    log.info("nodule bank: %d nodules from %d scans -> %s", len(bank), len(cases), args.out)


def cmd_sample(args: argparse.Namespace) -> None:
    from .synthesis.volume_run import sample_shard_entry

    path = sample_shard_entry(_config(args), args.run, args.shard, args.shards, Path(args.results),
                              Path(args.bank), args.threads)  # fmt: skip
    log.info("shard manifest: %s", path)


def cmd_metrics(args: argparse.Namespace) -> None:
    """Image-quality metrics of any two folders of NIfTI volumes (settings from the config's metrics section)."""
    from .metrics.image_quality import folders_entry

    labels, cache = (Path(p) if p else None for p in (args.real_labels, args.cache))
    rows = folders_entry(_config(args), Path(args.real), Path(args.synthetic), labels, Path(args.out), cache,
                         args.threads)  # fmt: skip
    for r in rows:
        print(f"{r['metric']:>12} {r['region']:>6} {r['comparison']:<28} {r['value']:.4g} "
              f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}] N={r['n_a']} vs {r['n_b']}")  # fmt: skip


def cmd_bench(args: argparse.Namespace) -> None:
    from .diffusion.bench import bench_entry, refuse_unused
    from .diffusion.speed import speed_entry

    refuse_unused(args)  # every bench: the flags it would ignore
    if args.what == "speed":  # prints its own table; the rows also go to --out
        speed_entry(args)
        return
    if args.what == "studio":
        from .app.studio import bench_sites

        rows = bench_sites(_config(args), Path(args.results).resolve().parent, args.k, args.threads)
    else:
        rows = bench_entry(args, _config(args))
    for row in rows:
        print(json.dumps(row), flush=True)


def cmd_app(args: argparse.Namespace) -> None:
    from .app import launch

    launch(_config(args), Path(args.workdir), args.host, args.port, args.threads)


def cmd_segment(args: argparse.Namespace) -> None:
    from .segmentation.experiment import STEPS, run_experiment

    what = STEPS if args.what == "all" else (args.what,)
    run_experiment(_config(args), Path(args.results), Path(args.state), what, args.arm, args.seed, args.fold,
                   args.threads)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungddpm", description=__doc__)
    parser.add_argument("--configfile", action="append", default=[], help="workflow config (YAML), merged as Snakemake "
                        "does over config/config.yaml (app: <--workdir>/config/...), which is the default")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.source=lidc (repeatable)")  # fmt: skip
    parser.add_argument("--log", default=None, help="also log to this file")
    sub = parser.add_subparsers(dest="command", required=True)
    threads = {"type": _positive, "default": os.cpu_count() or 1, "help": "CPU threads (default: every core)"}
    p = sub.add_parser("cases", help="list the cases of the config and their split")
    p.set_defaults(func=cmd_cases)
    p = sub.add_parser("demo-dicom", help="write the demo phantom DICOM series")
    p.add_argument("--case", action="append", help="only this case (repeatable); default all")
    p.add_argument("--root", default=None, help="output root (default resources/demo)")
    p.set_defaults(func=cmd_demo_dicom)
    p = sub.add_parser("demo-images", help="write the demo cases in Lung-DDPM's CT/ + SEG/ layout (source images)")
    p.add_argument("--out", required=True, help="folder to hold CT/ and SEG/")
    p.add_argument("--format", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"],
                   help="file format of the volumes")  # fmt: skip
    p.add_argument("--root", default=None, help="demo DICOM root (default resources/demo; missing series are written)")
    p.set_defaults(func=cmd_demo_images)
    p = sub.add_parser("preprocess", help="DICOM -> HU volume, lung and nodule masks on the model grid")
    p.add_argument("--case", required=True, help="case id (`lungddpm cases` lists them)")
    p.add_argument("--out", required=True, help="output folder of the case")
    p.set_defaults(func=cmd_preprocess)
    p = sub.add_parser("layout", help="lung + nodule masks -> semantic layout (0/1/2)")
    p.add_argument("--case-dir", required=True, help="a preprocessed case's folder (results/preprocessed/<case>)")
    p.add_argument("--out", required=True, help="the layout to write (.nii.gz)")
    p.set_defaults(func=cmd_layout)
    p = sub.add_parser("split", help="write the patient-level train/val/test split")
    p.add_argument("--out", required=True, help="the split CSV to write (the workflow's: results/splits.csv)")
    p.set_defaults(func=cmd_split)
    p = sub.add_parser("demo-qc", help="score lung masks and nodule positions against the demo phantom's truth")
    p.add_argument("--root", default=None, help="demo DICOM root (default resources/demo)")
    p.add_argument("--preprocessed", default="results/preprocessed", help="folder of the preprocessed cases")
    p.add_argument("--out", required=True, help="the QC CSV to write")
    p.set_defaults(func=cmd_demo_qc)
    p = sub.add_parser("train", help="train the diffusion model on the train split (torchrun if train.processes > 1)")
    p.add_argument("--results", default="results", help="results root holding preprocessed/ and layouts/")
    p.add_argument("--state", default="state", help="root of resumable state (checkpoints)")
    p.add_argument("--threads", **threads)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("train-job", help="(internal) one rank of a training job written by `train`")
    p.add_argument("job", help="the job file that `train` wrote")
    p.set_defaults(func=cmd_train_job)
    p = sub.add_parser(
        "import-lungddpm",
        help="convert a released Lung-DDPM checkpoint into a lungddpm model checkpoint (model.num_heads, "
        "model.norm_groups and init_convention.* from the config)",
    )
    p.add_argument("checkpoint", help="e.g. Lung-DDPM-LIDC-IDRI-100000-steps.pt (loaded with weights_only=True)")
    p.add_argument("--out", required=True,
                   help="the lungddpm checkpoint to write, e.g. results/models/lung-ddpm/checkpoint.pt")  # fmt: skip
    p.set_defaults(func=cmd_import_lungddpm)
    p = sub.add_parser("rois", help="lesion-scale ROIs of one case from its source DICOM (needs its preprocess)")
    p.add_argument("--case", required=True, help="case id (`lungddpm cases` lists them)")
    p.add_argument("--preprocessed", default=None, help="default results/preprocessed/<case>")
    p.add_argument("--out", required=True, help="the case's ROI folder to write")
    p.set_defaults(func=cmd_rois)
    p = sub.add_parser("nodule-bank", help="build the nodule bank for layout editing")
    p.add_argument("--out", default="resources/nodule_bank.npz", help="the bank (.npz) to write")
    p.set_defaults(func=cmd_nodule_bank)
    p = sub.add_parser("sample", help="sample one shard of a run (eval: test layouts; augment: edited train layouts)")
    p.add_argument("--run", choices=["eval", "augment"], required=True, help="eval: test layouts; augment: edited")
    p.add_argument("--shard", type=int, default=0, help="this shard, 0 to --shards - 1")
    p.add_argument("--shards", type=_positive, default=None, help="shards of the run (default sample.shards)")
    p.add_argument("--results", default="results", help="results root")
    p.add_argument("--bank", default="resources/nodule_bank.npz", help="the nodule bank (augment's insertions)")
    p.add_argument("--threads", **threads)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser(
        "metrics",
        help="image quality of two folders of NIfTI volumes: synthetic <case>_<k> paired with real <case>; the real "
        "volumes are split by patient into a floor (with every paired case) and a reference, so the real folder also "
        "needs >= 2 volumes that no synthetic volume was sampled from",
    )
    p.add_argument("--real", required=True, help="folder of real volumes (*.nii.gz)")
    p.add_argument("--synthetic", required=True, help="folder of synthetic volumes (with <name>_layout.nii.gz)")
    p.add_argument("--real-labels", default=None, help="folder of layouts <case>.nii.gz of the real volumes")
    p.add_argument("--out", required=True, help="folder for image_quality.csv and per_case.csv")
    p.add_argument(
        "--cache",
        default=None,
        help="feature cache (default $LUNGDDPM_CACHE/features, else ~/.cache/lungddpm/features)",
    )
    p.add_argument("--threads", **threads)
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("bench", help="benchmarks: train step time, sampling time per volume, sampler quality")
    p.add_argument(
        "what",
        choices=["train", "sample", "quality", "studio", "speed"],
        help="train: step time; sample: seconds per volume; quality: samplers on the test layouts; studio: seconds "
        "per nodule in the app (--k sites in the first case of the results' parent workflow); speed: the original "
        "Lung-DDPM network (--lung-ddpm) against ours, side by side, per mode",
    )
    p.add_argument("--lung-ddpm", default="peers/Lung-DDPM", help="speed: a checkout of Manem-Lab/Lung-DDPM")
    p.add_argument("--modes", nargs="+", default=None, help="speed: NETWORK:PRECISION[:COMPILE][:channels-last]"
                   "[:device-rng][:checkpoint] (default: the device's set)")  # fmt: skip
    p.add_argument("--sizes", type=_positive, nargs="+", default=[32, 64], help="speed: cubic grid edges")
    p.add_argument("--batch-sizes", nargs="+", type=_batch, default=[1],
                   help="speed: batches; max = the largest that fits (GPU)")  # fmt: skip
    p.add_argument("--sampler-steps", type=_positive, default=20, help="speed: DPM-Solver++ steps per volume")
    p.add_argument("--channels", type=_positive, default=64, help="speed: base channels of both networks (paper 64)")
    p.add_argument("--guidance", type=float, default=1.0, help="speed: != 1 = guided sampling, two passes per step "
                   "(the lesion scale's inpainting)")  # fmt: skip
    p.add_argument("--samplers", nargs="+", default=["ddpm:250", "ddim:50", "dpm++:20"], help="NAME:STEPS")
    p.add_argument("--k", type=_positive, default=2, help="quality: samples per test layout; studio: sites")
    p.add_argument("--results", default="results", help="quality: results root")
    p.add_argument("--out", default=None, help="quality: also write the table to this JSON file; speed: a folder")
    p.add_argument("--size", type=_positive, default=None, help="cubic grid edge (64; --scale lesion: the ROI's)")
    p.add_argument("--batch", type=_positive, nargs="+", default=[1], help="batch (lesion sample: nodules per batch)")
    p.add_argument("--scale", choices=["whole", "lesion"], default="whole", help="lesion: the lesion network's")
    p.add_argument("--model", choices=["config", "paper"], default="paper", help="network: the config's or the paper's")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"], help="to time")
    p.add_argument("--compile", action="store_true", help="also run torch.compile")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--profile", action="store_true", help="speed: also profile each row into <--out or .>/profile/")
    p.add_argument("--steps", type=_positive, default=3, help="timed steps (after warm-up); speed: repeats (median)")
    p.add_argument("--threads", **threads)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("segment", help="downstream nnU-Net v2: prepare/train each arm, score it on the test split, "
                       "compare the arms")  # fmt: skip
    p.add_argument("what", choices=["prepare", "train", "score", "compare", "all"], help="the stage, or all in order")
    p.add_argument("--arm", action="append", help="only this arm (repeatable); default every configured arm")
    p.add_argument("--seed", type=int, action="append", help="only this seed (repeatable)")
    p.add_argument("--fold", action="append", choices=[*"01234", "all"], help="only this fold (repeatable)")
    p.add_argument("--results", default="results", help="results root")
    p.add_argument("--state", default="state",
                   help="root of nnU-Net's folders (state/segmentation/<scale>/<arm>/seed<s>)")  # fmt: skip
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads of every step (default: as the rules: "
                   "segmentation.processes to prepare, segmentation.threads to train)")  # fmt: skip
    p.set_defaults(func=cmd_segment)
    p = sub.add_parser("app", help="the interactive nodule studio: a local web app over the workflow's results")
    p.add_argument("--workdir", default=".", help="the workflow directory (its results/ and resources/)")
    p.add_argument("--host", default=None, help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--threads", **threads)
    p.set_defaults(func=cmd_app)
    for p in sub.choices.values():  # also after the stage, as in `lungddpm app --configfile my.yaml`
        p.add_argument("--configfile", dest="stage_configfile", action="append", default=[],
                       help="workflow config (YAML), as --configfile before the command")  # fmt: skip
        p.add_argument("--set", dest="stage_set", action="append", default=[], metavar="KEY=VALUE",
                       help="as --set before the command; applied after those")  # fmt: skip
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, ``--configfile`` / ``--set`` given before or after the stage (``--set``: those before first)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    files = list(dict.fromkeys([*args.configfile, *args.stage_configfile]))  # given twice: once
    if len(files) > 1:  # Snakemake merges several; one here, so that none is dropped without a word
        parser.error(f"--configfile {' and '.join(files)}: give one config file (merge the others' keys into it)")
    args.configfile, args.set = (files or [None])[0], args.set + args.stage_set
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        setup_logging(args.log)
    except OSError as exc:
        print(f"lungddpm: --log {args.log}: cannot write it ({exc.strerror or exc}); give a file path", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except LungDDPMError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
