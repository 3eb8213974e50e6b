"""``lungddpm --configfile``: the config Snakemake would see; ``lungddpm sample``'s shards."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from snakemake.utils import update_config

from lungddpm.cli import _config, main, parse_args
from lungddpm.config import load_config, validate_config
from lungddpm.errors import ConfigError, LungDDPMError

REPO = Path(__file__).resolve().parents[1]
PARTIAL = {"sample": {"steps": 30}, "segmentation": {"seeds": [3, 4]}}


def _cli_config(*argv: str) -> dict[str, Any]:
    return _config(parse_args([*argv])).raw


@pytest.fixture
def workflow_dir(tmp_path: Path) -> Path:
    """A workflow directory holding the shipped config/config.yaml, and a partial my.yaml beside it."""
    (tmp_path / "wf/config").mkdir(parents=True)
    shutil.copy2(REPO / "config/config.yaml", tmp_path / "wf/config/config.yaml")
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(PARTIAL))
    return tmp_path / "wf"


def test_a_partial_configfile_is_merged_over_the_workflow_config_as_snakemake_merges_it(
    workflow_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO, logger="lungddpm")
    shipped = yaml.safe_load((REPO / "config/config.yaml").read_text())
    through_snakemake = copy.deepcopy(shipped)
    update_config(through_snakemake, copy.deepcopy(PARTIAL))
    expected = validate_config(through_snakemake)
    partial = str(workflow_dir.parent / "my.yaml")
    monkeypatch.chdir(workflow_dir)
    merged = _cli_config("--configfile", partial, "cases")
    assert merged == expected
    # the demo's lesion model, not the schema's defaults (which a file read alone would get)
    assert merged["lesion"]["train"]["name"] == "demo" and merged["model"]["model_channels"] == 24
    assert (merged["lesion"]["roi"]["size"], merged["lesion"]["roi"]["spacing_mm"]) == (32, 1.25)
    assert merged["sample"]["steps"] == 30 and merged["segmentation"]["seeds"] == [3, 4]  # lists replaced
    assert f"config: {partial} merged over config/config.yaml" in caplog.text
    assert _cli_config("--configfile", partial, "--set", "sample.steps=40", "cases")["sample"]["steps"] == 40
    # the workflow's config itself, named or by default: read once, nothing merged
    caplog.clear()
    assert _cli_config("--configfile", "config/config.yaml", "cases") == validate_config(copy.deepcopy(shipped))
    assert _cli_config("cases") == validate_config(copy.deepcopy(shipped)) and "merged" not in caplog.text
    # app: the base is --workdir's config/config.yaml, whatever the working directory
    monkeypatch.chdir(workflow_dir.parent)
    assert _cli_config("--configfile", partial, "app", "--workdir", str(workflow_dir)) == expected
    assert _cli_config("app", "--workdir", str(workflow_dir))["sample"]["steps"] == shipped["sample"]["steps"]
    # after the stage too, as docs/studio.md writes `lungddpm app [--configfile my.yaml]`; --set after those before it
    assert _cli_config("app", "--workdir", str(workflow_dir), "--configfile", partial) == expected
    after = _cli_config("--set", "sample.steps=40", "app", "--workdir", str(workflow_dir), "--set", "sample.steps=50")
    assert after["sample"]["steps"] == 50
    with pytest.raises(SystemExit, match="2"):
        parse_args(["--configfile", partial, "app", "--configfile", "other.yaml"])
    # twice before the stage: the first was dropped without a word (Snakemake merges both)
    with pytest.raises(SystemExit, match="2"):
        parse_args(["--configfile", partial, "--configfile", "other.yaml", "cases"])
    assert "--configfile" in capsys.readouterr().err.splitlines()[-1]
    assert _cli_config("--configfile", partial, "cases", "--configfile", partial)["sample"]["steps"] == 30  # one file
    # a --workdir without a workflow config: refused, not the config of the working directory's workflow instead
    monkeypatch.chdir(workflow_dir)
    with pytest.raises(LungDDPMError, match="--workdir /nowhere/wf: no config/config.yaml there; give the folder"):
        _cli_config("app", "--workdir", "/nowhere/wf")
    monkeypatch.chdir(workflow_dir.parent)
    # no workflow config here: the file alone, as before, now said (the CLI would run other settings than Snakemake)
    caplog.clear()
    alone = _cli_config("--configfile", partial, "cases")
    assert "alone, the schema's defaults for the rest: no config/config.yaml here" in caplog.text
    assert alone["lesion"]["train"]["name"] == "lesion" and alone["model"]["model_channels"] == 64
    assert alone["sample"]["steps"] == 30


def test_load_config_names_both_files_when_the_merge_is_invalid(workflow_dir: Path) -> None:
    bad = workflow_dir / "bad.yaml"
    bad.write_text("sample: {steps: 0}\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml merged over .*config.yaml: invalid configuration[\s\S]*sample.steps"
    ):
        load_config(bad, base=workflow_dir / "config/config.yaml")


def _fake_synthesize(run: str, items: list, *args: Any) -> list[dict[str, Any]]:
    return [{"name": it.name, "seed": it.seed} for it in items]


def test_sample_shards_default_to_the_config_and_bad_shards_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lungddpm.synthesis.volume_run as volume_run

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(volume_run, "synthesize_shard", _fake_synthesize)
    shipped = yaml.safe_load((REPO / "config/config.yaml").read_text())["sample"]["shards"]
    assert shipped == 2
    cmd = ["sample", "--run", "eval", "--results", str(tmp_path)]
    assert main([*cmd, "--shard", "0"]) == 0 and main([*cmd, "--shard", "1"]) == 0
    shards = [json.loads((tmp_path / f"synthetic/eval/shard_{i}.json").read_text())["items"] for i in (0, 1)]
    assert all(shards) and not {json.dumps(i) for i in shards[0]} & {json.dumps(i) for i in shards[1]}
    assert main([*cmd, "--shard", "0", "--shards", "1"]) == 0  # one shard: the whole run, beside the workflow's
    whole = json.loads((tmp_path / "synthetic/eval/shard_0_of_1.json").read_text())["items"]
    assert sorted(map(json.dumps, whole)) == sorted(map(json.dumps, shards[0] + shards[1]))
    assert json.loads((tmp_path / "synthetic/eval/shard_0.json").read_text())["items"] == shards[0]  # untouched
    capsys.readouterr()
    assert main([*cmd, "--shard", "2"]) == 2
    assert "--shard 2: not a shard of --shards 2; choose 0 to 1" in capsys.readouterr().err
    assert main([*cmd, "--shard", "-1", "--shards", "3"]) == 2
    assert "--shard -1: not a shard of --shards 3; choose 0 to 2" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main([*cmd, "--shards", "0"])
    assert "--shards: '0' is not a whole number >= 1" in capsys.readouterr().err


def test_the_cli_refuses_what_snakemake_refuses_and_bad_numbers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lesion model's keys are checked as at Snakemake's parse time; counts are whole numbers >= 1; a --set
    under a key an earlier --set gave a value replaces it (a traceback before)."""
    monkeypatch.chdir(REPO)
    assert main(["--set", "lesion.train.stpes=3", "cases"]) == 2
    assert "train: Additional properties are not allowed ('stpes' was unexpected)" in capsys.readouterr().err
    assert main(["--set", "train=1", "--set", "train.stpes=2", "cases"]) == 2  # the later replaced the value
    assert "train: Additional properties are not allowed ('stpes' was unexpected)" in capsys.readouterr().err
    for bad, message in ((["sample", "--run", "eval", "--threads", "0"], "--threads: '0' is not a whole number >= 1"),
                         (["segment", "--fold", "7"], "--fold: invalid choice: '7'")):  # fmt: skip
        with pytest.raises(SystemExit, match="2"):
            main(bad)
        assert message in capsys.readouterr().err
    # scoring one fold would rewrite the arm's scores.csv (the workflow's, every seed and fold) with that fold alone
    assert main(["segment", "score", "--fold", "1", "--seed", "0"]) == 2
    assert "segment score: an arm's scores.csv covers every seed [0] and fold ['all'] of the config (the workflow's " \
        "table), not seeds [0] and folds ['1'] alone" in capsys.readouterr().err  # fmt: skip
    # mappings merge key by key, whichever --set came first (as Snakemake's update_config)
    monkeypatch.chdir(REPO)
    merged = _cli_config("--set", "data.consensus_level=0.25", "--set", "data={min_readers: 2}", "cases")["data"]
    assert (merged["consensus_level"], merged["min_readers"]) == (0.25, 2)


def test_unreadable_overrides_config_files_and_splits_are_named(tmp_path: Path) -> None:
    """A --set value that is not YAML, a --configfile that is a folder or binary, a splits.csv of older code: each
    named with its fix (they were bare YAML / OS / Unicode / Key errors)."""
    from lungddpm.config import set_overrides
    from lungddpm.preprocessing.cases import check_written_split

    with pytest.raises(
        ConfigError,
        match=r"--set 'preprocess.size=\[64,64': the value is not YAML \(expected ',' or '\]', but got '<stream end",
    ):
        set_overrides(["preprocess.size=[64,64"])
    assert set_overrides(["a.b=[1, 2]", "a.c=x"]) == {"a": {"b": [1, 2], "c": "x"}}
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81")
    for path in (tmp_path, tmp_path / "binary.yaml"):
        with pytest.raises(ConfigError, match=rf"{path.name}: not a readable YAML text file .*config file's path"):
            load_config(path)
    (tmp_path / "splits.csv").write_text("case_id,subset\nLIDC-IDRI-0001,train\n")
    with pytest.raises(ConfigError, match=r"splits.csv: no has_nodule / subset column .*delete it to split anew"):
        check_written_split(tmp_path / "splits.csv", {"LIDC-IDRI-0001": "train"}, {"LIDC-IDRI-0001": True}, dict)


def test_a_bad_train_job_and_a_bench_size_off_the_network_are_named_before_any_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train-job`` with a missing, non-JSON or foreign file and ``bench --size`` that the network cannot halve give
    one line naming the file or the size and the fix (raw KeyError / JSONDecodeError / the UNet's ValueError after
    the network was built, before)."""
    monkeypatch.chdir(REPO)
    (tmp_path / "other.json").write_text('{"config": {}}')
    (tmp_path / "text.json").write_text("not json")
    for name, message in (("missing.json", "No such file"), ("text.json", "Expecting value"),
                          ("other.json", "missing train_cts, train_layouts, val_cts")):  # fmt: skip
        assert main(["train-job", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / name}: not a" in err and message in err and "rerun that" in err
        assert "Traceback" not in err
    assert main(["bench", "sample", "--size", "30"]) == 2
    err = capsys.readouterr().err
    assert "--size 30: the network halves the grid 4 times (model.channel_mult [1, 1, 2, 3, 4])" in err  # the paper's
    assert "a multiple of 16; try --size 16" in err and "Traceback" not in err
    assert main(["bench", "train", "--model", "config", "--size", "30"]) == 2
    err = capsys.readouterr().err
    assert "halves the grid 2 times (model.channel_mult [1, 2, 2]), so the edge must be a multiple of 4" in err
    assert "; try --size 28" in err
    # samplers, batch sizes and the log file, named before any work (tracebacks, or a batch of 0 taken as max)
    for spec in ("foo:2", "ddim:0", "ddim:9999"):
        assert main(["bench", "sample", "--model", "config", "--size", "16", "--samplers", spec]) == 2
        err = capsys.readouterr().err
        assert (
            f"--samplers '{spec}': expected NAME:STEPS with NAME one of ['ddpm', 'ddim', 'dpm++'] and 1 to 250" in err
        )
    # the lesion inpainting bench runs on the config's ROI grid, eagerly: flags it would drop are refused
    assert main(["bench", "sample", "--scale", "lesion", "--size", "48", "--channels-last"]) == 2
    assert "--size, --channels-last: not used by bench sample --scale lesion" in capsys.readouterr().err
    # so are those the whole-volume sampler and the side-by-side speed run would drop (they were ignored)
    assert (
        main(["bench", "sample", "--model", "config", "--size", "16", "--compile", "--batch", "4", "--steps", "7"]) == 2
    )
    assert "--compile, --batch, --steps: not used by bench sample (speed: --sizes" in capsys.readouterr().err
    assert main(["bench", "train", "--model", "config", "--size", "16", "--profile"]) == 2  # it profiled nothing
    assert "--profile: not used by bench train" in capsys.readouterr().err
    assert main(["bench", "studio", "--profile"]) == 2  # refused before the studio bench looks for its workflow
    assert "--profile: not used by bench studio" in capsys.readouterr().err
    assert main(["bench", "speed", "--lung-ddpm", "/nowhere", "--size", "32", "--precision", "bf16"]) == 2
    assert (
        "--size, --precision: not used by bench speed (speed: --sizes, --batch-sizes, --modes"
        in capsys.readouterr().err
    )
    for batch in ("foo", "0"):
        with pytest.raises(SystemExit, match="2"):
            main(["bench", "speed", "--batch-sizes", "1", batch])
        assert f"--batch-sizes: '{batch}' is neither a whole number >= 1 nor max" in capsys.readouterr().err
    assert main(["--log", str(tmp_path), "cases"]) == 2
    assert f"--log {tmp_path}: cannot write it (Is a directory); give a file path" in capsys.readouterr().err


def test_every_option_of_every_command_says_what_it_is() -> None:
    """`lungddpm <command> --help` explains each option (--case, --out, --threads had no text)."""
    import argparse

    from lungddpm.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) >= 17
    silent = [f"{c} {a.option_strings or a.dest}" for c, p in sub.choices.items() for a in p._actions if not a.help]
    assert silent == []
