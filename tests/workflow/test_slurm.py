"""Scale-out: the Slurm profiles, the sbatch flags the pinned plugin makes of them, and one torchrun rank per GPU.

The real-Slurm run itself is ``.ci/slurm_test.sh`` (it needs apt and root, so it is a CI step of its own).
"""

from __future__ import annotations

import logging
import re
import runpy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from conftest import REPO, make_workdir, snakemake

from lungddpm.config import validate_config
from lungddpm.diffusion.jobs import job_gpus, launch, launch_training, torchrun_command, train_processes
from lungddpm.errors import ConfigError, LungDDPMError

GPU_RULES = ("train", "sample", "metrics", "segment_train", "train_lesion", "synthesize_lesion", "lesion_texture")


def profile(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())


def rule_resources() -> dict[str, dict[str, str]]:
    """rule -> its ``resources:`` entries (name -> expression text), from rules/*.smk."""
    out: dict[str, dict[str, str]] = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=\s*rule \w+:)", smk.read_text()):
            name = re.match(r"\s*rule (\w+):", block)
            if not name:
                continue
            res = re.search(r"\n(\s+)resources:\n((?:\1\s+.*\n)+)", block + "\n")
            entries = re.findall(r"(\w+)=(.+?),?\s*$", res.group(2), re.M) if res else []
            out[name.group(1)] = dict(entries)
    return out


def test_cluster_profile_gives_gpu_rules_gpus_and_ci_profile_none() -> None:
    real, ci = profile("slurm"), profile("slurm-ci")
    assert real["executor"] == ci["executor"] == "slurm"
    for rule in GPU_RULES:
        res = real["set-resources"][rule]
        assert res["gpu"] >= 1 and res["cpus_per_gpu"] >= 1 and res["mem_mb"] > 0 and res["runtime"] > 0, rule
        assert real["set-threads"][rule] == res["gpu"] * res["cpus_per_gpu"], rule
        assert "gpu_model" not in res  # a site-specific GRES type: left commented for the user
    # every rule that declares a gpu resource is covered by both profiles
    declared = {rule for rule, res in rule_resources().items() if "gpu" in res}
    assert {"train", "sample"} <= declared and declared == set(GPU_RULES)
    assert declared <= set(real["set-resources"]) & set(ci["set-resources"])
    # CI overrides each declared gpu with 0 (left out, the rule's own, train.gpus' 1 in config/paper.yaml, stood)
    assert all(ci["set-resources"][rule].get("gpu") == 0 for rule in declared)
    # CI: no GPU request anywhere (the node has none), memory capped below the node's 4000 MB minimum
    cap = ci["default-resources"]["mem_mb"]
    assert 2 * cap <= 4000
    for rule, res in ci["set-resources"].items():
        assert res.get("gpu", 0) == 0 and "gpu_model" not in res and "cpus_per_gpu" not in res, rule
        assert res.get("mem_mb", cap) <= cap, rule
    for rule, res in rule_resources().items():
        if "mem_mb" in res and int(res["mem_mb"]) > cap:
            assert ci["set-resources"].get(rule, {}).get("mem_mb", 10**9) <= cap, f"{rule}: not capped in slurm-ci"
    assert ci["slurm-status-command"] == "squeue" and ci["slurm-no-account"] is True


class Resources(dict):
    """What the plugin reads from a job's resources: ``.get`` and attribute access."""

    __getattr__ = dict.get


def fake_job(rule: str, prof: dict[str, Any], threads: int) -> SimpleNamespace:
    res = Resources({**prof["default-resources"], **prof["set-resources"][rule]})
    return SimpleNamespace(resources=res, threads=threads, name=rule, is_group=lambda: False, wildcards={})


@pytest.mark.parametrize("gpus", [1, 4])
def test_plugin_turns_the_profile_into_gpu_sbatch_flags(gpus: int) -> None:
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "", "partition": "", "workdir": "w"}
    real = profile("slurm")
    real["set-resources"]["train"]["gpu"] = gpus
    job = fake_job("train", real, real["set-threads"]["train"])
    call = get_submit_command(job, params) + set_gres_string(job)
    assert f"--gpus={gpus}" in call and "--cpus-per-gpu=8" in call and "--mem 64000" in call, call
    assert "--cpus-per-task" not in call and "-t 2880" in call
    assert "--nodes=1" in call  # torchrun --standalone: the job's GPUs on one node
    assert real["cores"] >= gpus * 8  # the threads N GPUs x cpus_per_gpu are not cut to the profile's cores
    ci = profile("slurm-ci")
    job = fake_job("train", ci, ci["set-threads"]["train"])
    call = get_submit_command(job, params) + set_gres_string(job)
    assert "--gpus" not in call and "--cpus-per-task=2" in call and "--mem 1500" in call, call


def test_one_torchrun_rank_per_gpu_of_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a host without CUDA: the request stands
    assert job_gpus(2, {}) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert job_gpus(2, {}) == 1  # CUDA_VISIBLE_DEVICES unset: capped by the GPUs present
    # where CUDA is available its own count wins over the entries (two MIG slices: one per process; "0,0": none)
    assert job_gpus(2, {"CUDA_VISIBLE_DEVICES": "MIG-a,MIG-b"}) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA: what the scheduler's variable says
    assert job_gpus(4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == 4
    assert job_gpus(4, {"CUDA_VISIBLE_DEVICES": "2,3"}) == 2  # fewer visible than requested: the visible ones
    assert job_gpus(0, {"CUDA_VISIBLE_DEVICES": "0"}) == 0
    assert job_gpus(1, {"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert job_gpus(2, {"CUDA_VISIBLE_DEVICES": "0,-1,1"}) == 1  # CUDA stops reading at the first invalid entry
    # a job holding GPUs where CUDA shows none is refused, never trained on the CPU while its GPUs stay reserved
    with pytest.raises(LungDDPMError, match=r"this job holds 2 GPU\(s\) \(its rule's gpu resource, from train.gpus or"
                       r" a profile\) for 2 rank\(s\), but CUDA shows 0 here.*or set train.gpus: 0"):  # fmt: skip
        launch({"gpus": 2, "state_dir": "unused", "threads": 2}, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the train_lesion rule's one GPU, as the CLI's
    with pytest.raises(LungDDPMError, match=r"this job holds 1 GPU\(s\) .* for 1 rank\(s\), but CUDA shows 0"):
        launch_training({"state_dir": "unused", "threads": 2}, 1)
    monkeypatch.undo()
    assert train_processes(1, 4) == 4  # a job with 4 GPUs: 4 ranks
    assert train_processes(1, 1) == train_processes(1, 0) == 1
    assert train_processes(2, 0) == 2  # CPU DDP (gloo), as in the tests
    with pytest.raises(LungDDPMError, match="train.processes is 4 but the job holds 2 GPU"):
        train_processes(4, 2)
    cmd = torchrun_command(Path("state/models/demo/job.json"), 4)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[-3:] == ["lungddpm.cli", "train-job", "state/models/demo/job.json"]
    with pytest.raises(ConfigError, match="train.processes: 4 processes for 2 GPU"):
        validate_config({"train": {"processes": 4, "gpus": 2}})


@pytest.mark.parametrize(("gpu", "visible", "ranks"), [(2, None, 2), (4, "0,1,2,3", 4), (1, "0", 1), (0, None, 1)])
def test_train_rule_launches_one_rank_per_gpu_of_its_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpu: int, visible: str | None, ranks: int
) -> None:
    """scripts/train.py (the train rule's adapter) hands launch() one process per GPU of its job: the gpu resource
    Snakemake gives the job (from the profile's set-resources, i.e. sbatch --gpus) and the devices Slurm exposes."""
    import lungddpm.diffusion.jobs as train_module

    launched: list[tuple[dict[str, Any], int]] = []
    monkeypatch.setattr(train_module, "launch", lambda job, processes: launched.append((job, processes)))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    names = {"ct": [], "layouts": [], "val_ct": [], "val_layouts": []}
    job = SimpleNamespace(
        input=SimpleNamespace(**names),
        output=SimpleNamespace(checkpoint=str(tmp_path / "results/models/demo/checkpoint.pt")),
        params=SimpleNamespace(state_dir=str(tmp_path / "state/models/demo"), processes=1),
        resources=Resources({"gpu": gpu, "mem_mb": 1000}),
        threads=8,
        log=[str(tmp_path / "train.log")],
        config=validate_config({"train": {"gpus": gpu}}),
    )
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        runpy.run_path(str(REPO / "scripts/train.py"), init_globals={"snakemake": job})
    finally:  # the adapter sets up the rule's log file as the root handler: put pytest's back
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    assert [n for _, n in launched] == [ranks]
    assert launched[0][0]["threads"] == 8 and launched[0][0]["state_dir"] == job.params.state_dir
    if ranks > 1:
        assert f"--nproc_per_node={ranks}" in torchrun_command(Path("job.json"), ranks)


def test_the_lesion_jobs_request_the_lesion_models_gpu(tmp_path: Path) -> None:
    """lesion.train.gpus: 1 gives train_lesion (and the lesion run) a GPU while the whole-volume model keeps
    train.gpus 0 (before: the lesion jobs followed train.gpus alone)."""
    work = make_workdir(tmp_path)
    dry = snakemake(work, "-n", "--config", "lesion={train: {gpus: 1}}").stdout
    resources = {rule: re.search(rf"\nrule {rule}:\n(?:    .*\n)*?    resources: (.*)", dry).group(1)
                 for rule in ("train", "train_lesion")}  # fmt: skip
    assert "gpu=1" in resources["train_lesion"] and "gpu=0" in resources["train"], resources
