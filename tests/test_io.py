from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from lungddpm.atomic import atomic_path
from lungddpm.errors import LungDDPMError
from lungddpm.io import Geometry, read_json, read_volume, write_csv, write_json, write_volume, zip_damage


def test_nifti_round_trip_keeps_voxels_and_true_affine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 3000, (5, 6, 7)).astype(np.int16)
    geometry = Geometry(spacing=(2.5, 0.75, 0.7), origin=(-180.0, -170.5, -312.25))
    path = tmp_path / "ct.nii.gz"
    write_volume(path, array, geometry)
    back, geom2 = read_volume(path)
    assert back.dtype == np.int16 and np.array_equal(back, array)
    assert np.allclose(geom2.spacing, geometry.spacing) and np.allclose(geom2.origin, geometry.origin)
    # an independent reader sees the same world position (RAS = LPS with x, y negated) for a voxel
    img = nib.load(path)
    assert img.shape == (7, 6, 5)  # NIfTI stores (x, y, z)
    ras = img.affine @ np.array([3, 2, 1, 1.0])  # voxel x=3, y=2, z=1
    lps = geometry.index_to_world(np.array([[1, 2, 3]]))[0]
    assert np.allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)


def test_world_index_round_trip_with_rotation() -> None:
    c, s = np.cos(0.3), np.sin(0.3)
    geometry = Geometry(spacing=(3.0, 1.0, 2.0), origin=(1.0, 2.0, 3.0), direction=(c, -s, 0, s, c, 0, 0, 0, 1))
    idx = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 7.0]])
    assert np.allclose(geometry.world_to_index(geometry.index_to_world(idx)), idx)
    # against SimpleITK's own mapping (a round trip alone passes with the rotation's sense reversed in both ways)
    img = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    img.SetSpacing(geometry.spacing[::-1])
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    for z, y, x in idx:
        world = img.TransformContinuousIndexToPhysicalPoint((x, y, z))
        assert np.allclose(geometry.index_to_world(np.array([[z, y, x]]))[0], world, atol=1e-9)
        assert np.allclose(geometry.world_to_index(np.array([world]))[0], (z, y, x), atol=1e-9)


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with pytest.raises(ValueError, match=r"x.nii.gz: expected a \[Z, Y, X\] array"):
        write_volume(target, np.zeros((2, 2)), Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))


@pytest.mark.parametrize("umask", [0o022, 0o037, 0o044, 0o777])
def test_the_process_umask_is_read_whole(tmp_path: Path, umask: int) -> None:
    """A folder made whole elsewhere gets ``0o777 & ~process_umask()``: a plain mkdir's mode for any umask (a mode
    derived from a file's, 0o666 less the umask, was wrong for umasks that part read from execute, e.g. 037)."""
    import os
    import stat

    from lungddpm.atomic import process_umask

    old = os.umask(umask)
    try:
        (tmp_path / "plain").mkdir()
        got = process_umask()
    finally:
        os.umask(old)
    assert got == umask and 0o777 & ~got == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path: Path, umask: int, mode: int) -> None:
    """mkstemp makes 0600 files: checkpoints and previews were private to their owner, unlike every other output."""
    import os
    import stat

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from lungddpm.diffusion.checkpoint import save_atomic

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
        write_volume(tmp_path / "v.nii.gz", np.zeros((2, 2, 2), np.int16), Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
        save_atomic({"w": torch.zeros(2)}, tmp_path / "checkpoint.pt")
        fig = plt.figure()
        with atomic_path(tmp_path / "preview.png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    got = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert got == dict.fromkeys(["a.json", "v.nii.gz", "checkpoint.pt", "preview.png", "plain.txt"], mode)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(LungDDPMError, match="missing.nii.gz: no such file"):
        read_volume(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(LungDDPMError, match="bad.nii.gz: not a readable NIfTI volume"):
        read_volume(bad)
    for name, image in (("plane.nii.gz", sitk.Image(5, 6, sitk.sitkInt16)),
                        ("vector.nii.gz", sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3))):  # fmt: skip
        sitk.WriteImage(image, str(tmp_path / name))
        with pytest.raises(LungDDPMError, match=f"{name}: a .* not a 3-D volume; give a 3-D scalar volume"):
            read_volume(tmp_path / name)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LungDDPMError, match="bad.json: invalid JSON"):
        read_json(tmp_path / "bad.json")
    write_json(tmp_path / "ok.json", {"a": np.float32(1.5), "b": np.arange(2)})
    assert read_json(tmp_path / "ok.json") == {"a": 1.5, "b": [0, 1]}


def test_a_row_key_that_is_no_column_is_refused(tmp_path: Path) -> None:
    """DictWriter's extrasaction never saw the extra keys (rows were rebuilt from the columns): a misspelt key
    vanished and its column was left empty."""
    write_csv(tmp_path / "ok.csv", [{"arm": "real", "mean": 0.5}], ["arm", "mean", "ci_low"])
    assert (tmp_path / "ok.csv").read_text().splitlines() == ["arm,mean,ci_low", "real,0.5,"]
    with pytest.raises(ValueError, match=r"t.csv: row keys \['mean_typo'\] are not columns of the table"):
        write_csv(tmp_path / "t.csv", [{"arm": "real", "mean_typo": 0.7}], ["arm", "mean"])
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_truncated_nifti_is_refused_not_read_with_zeros(tmp_path: Path, suffix: str) -> None:
    """SimpleITK reads a NIfTI cut short (a broken copy) as a whole volume with the missing voxels 0: refused,
    naming the file; own images (data.source: images) alike."""
    from lungddpm.data.images import read_ct
    from lungddpm.errors import ImageError
    from lungddpm.io import VolumeReadError

    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 400, (16, 32, 32)).astype(np.int16)
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(whole), useCompression=suffix.endswith(".gz"))
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    assert np.array_equal(read_volume(whole)[0], vol)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(cut))).shape == vol.shape  # what SimpleITK does alone
    with pytest.raises(VolumeReadError, match=rf"cut{suffix}: truncated: .*; delete it and rerun its stage"):
        read_volume(cut)
    with pytest.raises(ImageError, match=rf"cut{suffix}: truncated: .*; copy or export the volume again"):
        read_ct(cut, -1024, 3071)
    # whole files that are not one plain gzip stream read as before: trailing bytes, a plain file named .nii.gz
    from lungddpm.io import nifti_truncation

    trailing = tmp_path / f"trailing{suffix}"
    trailing.write_bytes(data + b"garbage after the stream")
    plain = tmp_path / "plain.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "plain.nii"))
    plain.write_bytes((tmp_path / "plain.nii").read_bytes())
    for path in (whole, trailing, plain):
        assert nifti_truncation(path) is None and np.array_equal(read_volume(path)[0], vol), path.name


def test_an_output_path_that_is_a_folder_is_named_before_any_work(tmp_path: Path) -> None:
    """``--out <folder>`` failed with IsADirectoryError from the rename, after the work."""
    with pytest.raises(LungDDPMError, match=rf"{tmp_path.name}: is a folder, not a file; give the path of the file"):
        write_csv(tmp_path, [{"a": 1}])
    with pytest.raises(LungDDPMError, match="is a folder, not a file"):
        write_volume(tmp_path, np.zeros((2, 2, 2), np.int16), Geometry((1.0,) * 3, (0.0,) * 3))
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))  # refused before a temporary was made beside it


def test_an_atomic_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """The phantom's DICOM series (``replace``) and the studio's downloads (never onto an earlier one)."""
    import os
    import stat

    from lungddpm.atomic import atomic_folder

    target = tmp_path / "series"
    with atomic_folder(target, replace=True) as folder:
        (folder.tmp / "a.dcm").write_text("1")
        assert not target.exists() and folder.tmp.parent == tmp_path and folder.tmp.name.startswith(".series.")
    assert folder.path == target and [p.name for p in target.iterdir()] == ["a.dcm"]
    with pytest.raises(RuntimeError, match="cut"), atomic_folder(target, replace=True) as folder:
        (folder.tmp / "b.dcm").write_text("2")
        raise RuntimeError("cut")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"] and (target / "a.dcm").read_text() == "1"
    with atomic_folder(target, replace=True) as folder:
        (folder.tmp / "b.dcm").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b.dcm"] and sorted(os.listdir(tmp_path)) == ["series"]
    (tmp_path / "file").write_text("x")  # replaced, it was left hidden beside the new folder
    with pytest.raises(LungDDPMError, match=r"file: is a file or link, not a folder; move it away"):
        with atomic_folder(tmp_path / "file", replace=True):
            pass
    assert sorted(os.listdir(tmp_path)) == ["file", "series"]
    (tmp_path / "file").unlink()

    made = []
    old = os.umask(0o027)
    try:
        for _ in range(3):
            with atomic_folder(tmp_path / "export", replace=False) as folder:
                (folder.tmp / "ct.nii.gz").write_text(str(len(made)))
            made.append(folder.path)
    finally:
        os.umask(old)
    assert [p.name for p in made] == ["export", "export-2", "export-3"]
    assert [(p / "ct.nii.gz").read_text() for p in made] == ["0", "1", "2"]  # none written onto another
    assert {stat.S_IMODE(p.stat().st_mode) for p in made} == {0o750}  # a plain mkdir's (mkdtemp's is 0700)
    with pytest.raises(OSError), atomic_folder(tmp_path / "export", replace=False) as folder:
        raise OSError(5, "I/O error")
    assert sorted(os.listdir(tmp_path)) == ["export", "export-2", "export-3", "series"]
    import errno

    from lungddpm.atomic import DiskFullError

    with pytest.raises(DiskFullError, match=r"export: no space left on device .*nothing was written there — free"):
        with atomic_folder(tmp_path / "export", replace=False) as folder:
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["export", "export-2", "export-3", "series"]


def test_a_folder_swap_killed_between_its_renames_is_cleaned_up_by_the_next_and_never_read(tmp_path: Path) -> None:
    """kill -9 after the earlier folder was moved aside: the next write of that folder removes it, and the killed
    write's temporary folder once an hour old (a younger one may be another process's); a DICOM series search never
    reads such hidden folders. They were left for good, and the search could return the earlier series."""
    import os
    import subprocess
    import sys
    import time

    from lungddpm.atomic import atomic_folder
    from lungddpm.data.dicom import dicom_files

    target = tmp_path / "series"
    target.mkdir()
    (target / "a.dcm").write_text("old")
    code = (
        "import sys; from pathlib import Path; from lungddpm.atomic import atomic_folder\n"
        "with atomic_folder(Path(sys.argv[1]), replace=True) as f:\n"
        "    (f.tmp / 'b.dcm').write_text('new')"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(target)], env={**os.environ, "LUNGDDPM_KILL_AT": "swap:1"})
    assert killed.returncode == -9 and not target.exists()
    old, tmp = sorted(tmp_path.glob(".series.old-*")), sorted(tmp_path.glob(".series.*.tmp"))
    assert len(old) == len(tmp) == 1 and (old[0] / "a.dcm").read_text() == "old"
    assert dicom_files(tmp_path, recursive=True) == []  # neither hidden folder is a series
    young = tmp_path / ".series.young.tmp"
    young.mkdir()
    os.utime(tmp[0], (time.time() - 7200,) * 2)
    with atomic_folder(target, replace=True) as folder:
        (folder.tmp / "c.dcm").write_text("newer")
    assert sorted(os.listdir(tmp_path)) == [".series.young.tmp", "series"] and dicom_files(target)[0].name == "c.dcm"


def test_a_header_read_gives_the_grid_without_the_voxels(tmp_path: Path) -> None:
    from lungddpm.io import read_header

    geometry = Geometry((2.5, 0.7, 0.8), (-10.0, 20.0, 30.0))
    write_volume(tmp_path / "v.nii.gz", np.zeros((3, 4, 5), np.uint8), geometry)
    shape, got = read_header(tmp_path / "v.nii.gz")
    assert shape == (3, 4, 5) and got == read_volume(tmp_path / "v.nii.gz")[1]
    assert np.allclose(got.spacing, geometry.spacing) and np.allclose(got.origin, geometry.origin)
    with pytest.raises(LungDDPMError, match=r"w.nii.gz: no such file; run the stage that produces it first"):
        read_header(tmp_path / "w.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"nope")
    with pytest.raises(LungDDPMError, match=r"bad.nii.gz: not a readable NIfTI volume"):
        read_header(tmp_path / "bad.nii.gz")


def test_atomic_writes_reach_the_disk_before_their_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power loss after the rename must find the new content: the file (every file of a folder) is synced before
    the rename, and the folder holding the name after it."""
    import os

    from lungddpm import atomic

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    target = tmp_path / "a.json"
    with atomic.atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert [e[0] for e in events] == ["sync", "rename", "sync"]
    assert Path(events[0][1]).name.startswith(".a.json.") and events[1][1] == str(target)
    assert events[2][1] == str(tmp_path)
    events.clear()
    with atomic.atomic_folder(tmp_path / "series", replace=False) as folder:
        (folder.tmp / "sub").mkdir()
        (folder.tmp / "sub" / "1.dcm").write_text("1")
        (folder.tmp / "2.dcm").write_text("2")
    synced = [Path(p).name for kind, p in events[:-2]]
    assert [e[0] for e in events] == ["sync"] * 4 + ["rename", "sync"]
    assert sorted(synced[:3]) == ["1.dcm", "2.dcm", "sub"] and synced[3].startswith(".series.")
    assert events[-2][1] == str(tmp_path / "series") and events[-1][1] == str(tmp_path)
    assert (tmp_path / "series" / "sub" / "1.dcm").read_text() == "1"


def test_stale_download_folders_go_and_a_cleanup_racing_another_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two studios on one workdir may clean the same killed download: the entry the other took first is skipped."""
    import os
    import time

    from lungddpm.atomic import remove_stale_folders

    for name in (".a.x.tmp", "claimed", "kept", ".young.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "kept" / "ct.nii.gz").write_bytes(b"done")  # a finished download, however old
    for name in (".a.x.tmp", "claimed", "kept"):
        os.utime(tmp_path / name, (time.time() - 7200,) * 2)
    (tmp_path / "file.tmp").write_bytes(b"")
    real_rmdir = Path.rmdir

    def taken(self: Path) -> None:  # the other studio removed it between our look and our rmdir
        real_rmdir(self)
        raise FileNotFoundError(2, "No such file or directory", str(self))

    monkeypatch.setattr(Path, "rmdir", taken)
    assert [p.name for p in remove_stale_folders(tmp_path)] == [".a.x.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".young.tmp", "file.tmp", "kept"]
    assert remove_stale_folders(tmp_path / "none") == []


def test_an_output_folder_that_may_be_written_but_not_read_still_takes_atomic_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Syncing the folder after the rename opens it; a folder of mode -wx cannot be opened (EACCES, as for a user
    other than root), and that must not fail the write."""
    import os

    from lungddpm import atomic

    real_open = os.open

    def no_read(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(atomic.os, "open", no_read)
    with atomic.atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "a.txt").read_text() == "x"


def test_zip_damage_names_what_is_wrong_and_passes_intact_or_legacy_files(tmp_path: Path) -> None:
    """A torch zip checkpoint: intact -> None; a bit flipped in a record, cut short, empty or not a zip (where a zip
    is expected) -> what is wrong; torch's legacy (non-zip) format, which has no checksum -> None."""
    import torch

    good, legacy, bad = tmp_path / "good.pt", tmp_path / "legacy.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, good)
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    raw = good.read_bytes()
    at = raw.index(np.arange(4096, dtype=np.float32)[2000:2004].tobytes())
    assert zip_damage(good) is None and zip_damage(legacy) is None
    assert zip_damage(legacy, expect_zip=True) == f"it is not a zip archive (starts {legacy.read_bytes()[:4]!r})"
    bad.write_bytes(raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :])
    assert zip_damage(bad) == "its member good/data/0 fails its CRC-32 check"
    bad.write_bytes(raw[: len(raw) - 100])
    assert zip_damage(bad) == "it is cut short (a zip archive without its directory at the end)"
    bad.write_bytes(b"")
    assert zip_damage(bad) is None and zip_damage(bad, expect_zip=True) == "it is not a zip archive (empty)"


def test_a_nifti_write_the_disk_cut_short_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SimpleITK's NIfTI writer does not raise when the disk fills (a plain .nii prints "NWAD: wrote only ...", a
    .nii.gz nothing): the cut temporary was renamed over the previous output. Now the write is checked first."""
    import lungddpm.io as io
    from lungddpm.atomic import DiskFullError

    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    target = tmp_path / "v.nii.gz"
    noise = np.random.default_rng(0).integers(-1000, 1000, (16, 16, 16)).astype(np.int16)  # no gzip shrinks it
    write_volume(target, noise, geometry)
    before = target.read_bytes()
    real = sitk.WriteImage

    def cut_short(image: sitk.Image, name: str, useCompression: bool = False) -> None:
        real(image, name, useCompression=useCompression)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[: len(data) // 2])  # the disk filled: the rest never written

    monkeypatch.setattr(io.sitk, "WriteImage", cut_short)
    with pytest.raises(LungDDPMError, match=r"v.nii.gz: the NIfTI writer stopped short \(.*bytes its header prom"):
        write_volume(target, noise[::-1].copy(), geometry)
    monkeypatch.setattr(io.os, "statvfs", lambda _: type("S", (), {"f_bavail": 0, "f_frsize": 4096})())
    with pytest.raises(DiskFullError, match=r"v.nii.gz: no space left on device while writing it"):
        write_volume(target, noise[::-1].copy(), geometry)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]
