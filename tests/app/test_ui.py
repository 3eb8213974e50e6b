"""The studio's page without a browser: the Blocks' event wiring and its handlers over a stand-in studio."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr
import numpy as np
import pytest

from lungddpm.app import ui
from lungddpm.app.checks import SEED_MAX, check_seed
from lungddpm.app.studio import CaseSession, Edit, StudioError
from lungddpm.atomic import DiskFullError
from lungddpm.io import Geometry


def toy_session(case_id: str) -> CaseSession:
    ct = np.full((6, 12, 12), -850, np.int16)
    labels = np.ones((6, 12, 12), np.uint8)
    return CaseSession(case_id, None, Geometry(spacing=(2.5, 0.7, 0.7), origin=(0.0, 0.0, 0.0)), ct, labels)  # type: ignore[arg-type]


class FakeStudio:
    """What :func:`lungddpm.app.ui.build_app` asks of a studio: case A opens, case B fails as a moved source does."""

    cfg = SimpleNamespace(
        raw={"lesion": {"insert": {"diameter_mm": [5, 15], "texture": "bank"}, "sample": {"steps": 4}}}
    )
    cases = ("A", "B", "C", "D", "E", "F")
    texture_requests = ("bank", "any", "ground-glass", "part-solid", "solid")

    def candidates(self, *args: Any) -> list[Any]:
        return []

    def open_case(self, case_id: str) -> CaseSession:
        if case_id == "B":
            raise StudioError("case B cannot be opened: /data/B: no DICOM series")
        return toy_session(case_id)

    def nodule(self, index: int) -> Any:
        return SimpleNamespace(index=index)

    def check_site(self, session: CaseSession, site: Any, nodule: Any, texture: str, seed: Any) -> Any:
        check_seed(seed)
        raise StudioError("a refused site")

    def export(self, session: CaseSession) -> dict[str, Any]:
        if session.case_id == "C":
            raise StudioError("nothing to download yet: insert a nodule first")
        raise DiskFullError("/w/results/studio/A/20261207-101010: no space left on device while writing it")


@pytest.fixture(scope="module")
def app() -> Any:
    return ui.build_app(FakeStudio())


def handler(app: Any, name: str) -> Any:
    """The (first) event function of ``app`` named ``name``."""
    return next(f for f in app.fns.values() if f.name == name)


def output(fn: Any, result: tuple[Any, ...], elem_id: str) -> Any:
    """The value ``result`` of ``fn`` gives the component ``elem_id``."""
    ids = [getattr(c, "elem_id", None) for c in fn.outputs]
    return result[ids.index(elem_id)]


def session_output(fn: Any, result: tuple[Any, ...]) -> Any:
    states = [n for n, c in enumerate(fn.outputs) if isinstance(c, gr.State) and c.value is None]
    return result[states[0]]


def test_every_handler_of_the_session_shares_one_queue(app: Any) -> None:
    """Gradio gives each event its own queue: a case opened during a generate would be overwritten by it."""
    touching = [f for f in app.fns.values() if any(isinstance(c, gr.State) for c in (*f.inputs, *f.outputs))]
    assert {f.name for f in touching} == {"open_case", "<lambda>", "handler", "pick_random", "run", "run_undo",
                                          "run_download"}  # fmt: skip
    assert all(f.concurrency_id == "studio" and f.concurrency_limit == 1 for f in touching)
    assert len(touching) == 9  # three planes' clicks


def test_a_case_that_fails_to_open_unloads_the_previous_one(app: Any) -> None:
    fn = handler(app, "open_case")
    opened = fn.fn("A", True, None, {})
    assert session_output(fn, opened).case_id == "A"
    assert output(fn, opened, "plane-axial") is not None
    failed = fn.fn("B", True, session_output(fn, opened), {})
    assert session_output(fn, failed) is None  # not case A under case B's name
    assert all(output(fn, failed, f"plane-{p}") is None for p in ui.PLANES)
    assert output(fn, failed, "roi") is None and output(fn, failed, "files") is None
    assert "**Refused:** case B cannot be opened" in output(fn, failed, "status")


def test_a_download_that_cannot_be_written_is_said_in_the_status_line(app: Any) -> None:
    """A full disk (or an unwritable folder) raised past the handler as Gradio's generic popup before."""
    fn = handler(app, "run_download")
    assert fn.fn(toy_session("C")) == (None, "**Refused:** nothing to download yet: insert a nodule first")
    files, status = fn.fn(toy_session("A"))
    assert files is None and status.startswith("**Not written:** /w/results/studio/A/20261207-101010: no space")


def test_opening_a_case_clears_the_previous_downloads(app: Any) -> None:
    fn = handler(app, "open_case")
    assert output(fn, fn.fn("A", True, None, {}), "files") is None


def toy_edit(s: CaseSession) -> None:
    """Insert a stand-in nodule (bank #7, HU 40 in a box) into ``s``, as Studio.generate records one."""
    roi = np.zeros((4, 4, 4), np.int16)
    box = (slice(1, 3), slice(2, 6), slice(2, 6))
    s.edits.append(Edit({"bank_index": 7, "diameter_mm": 6.0, "texture_requested": "bank", "site_index_kij": [2, 4, 4],
                         "nodule_mean_hu": 40.0}, Geometry(spacing=(2.5,) * 3, origin=(0.0,) * 3), roi, roi,
                        roi.astype(np.uint8), roi > 0, box, s.ct[box].copy(), s.labels[box].copy(), 0.1))  # fmt: skip
    s.ct[box] = 40


def test_a_case_left_with_inserted_nodules_is_kept_until_it_is_opened_again(app: Any) -> None:
    fn = handler(app, "open_case")
    a = session_output(fn, fn.fn("A", True, None, {}))
    toy_edit(a)
    on_c = fn.fn("C", True, a, {})
    held = on_c[1]  # outputs: session, kept sessions, cursor, ...
    assert session_output(fn, on_c).case_id == "C" and held == {"A": a} and output(fn, on_c, "roi") is None
    assert "A keeps its 1 inserted nodule(s)" in output(fn, on_c, "status")
    failed = fn.fn("B", True, session_output(fn, on_c), held)  # C has no nodule: not kept; A still is
    assert session_output(fn, failed) is None and "A keeps its 1" in output(fn, failed, "status")
    back = fn.fn("A", True, None, held)
    assert session_output(fn, back) is a and len(a.edits) == 1 and (a.ct == 40).sum() == 2 * 4 * 4
    assert "Back to A, with the 1 nodule(s)" in output(fn, back, "status") and "keeps" not in output(fn, back, "status")
    assert back[1] == {}


def test_a_tab_keeps_the_nodules_of_at_most_keep_cases_other_cases(app: Any) -> None:
    fn = handler(app, "open_case")
    s, held = None, {}
    for case in ("A", "C", "D", "E", "F"):  # a nodule in each, then the next case
        result = fn.fn(case, True, s, held)
        s, held = session_output(fn, result), result[1]
        toy_edit(s)
    assert ui.KEEP_CASES == 3 and list(held) == ["C", "D", "E"]  # A, the oldest, dropped when F opened
    assert "Dropped the nodules of A" in output(fn, result, "status")


def test_undo_clears_the_roi_panel(app: Any) -> None:
    s = toy_session("A")
    before = s.ct.copy()
    toy_edit(s)
    fn = handler(app, "run_undo")
    result = fn.fn(s, [2, 5, 5], True)
    assert output(fn, result, "roi") is None
    assert np.array_equal(s.ct, before) and "Removed bank nodule #7" in output(fn, result, "status")


def test_a_seed_out_of_range_or_empty_is_refused_in_the_status_line(app: Any) -> None:
    """The field itself has no bounds: Gradio would refuse such a value in a toast before the handler saw it."""
    seed = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "seed")
    assert (seed.minimum, seed.maximum, seed.precision) == (None, None, 0) and SEED_MAX == 2**62 - 1
    assert seed.preprocess(-1) == -1 and seed.preprocess(2**64) == 2**64  # reach the handler
    fn = handler(app, "run")
    for bad in (None, -1, 2**64):
        result = fn.fn(toy_session("A"), [2, 5, 5], 3, "bank", bad, True)
        assert "seed must be an integer 0..2**62-1" in output(fn, result, "status")


def test_a_port_in_use_is_refused_naming_the_option_and_the_cache_is_cleared(app: Any, tmp_path: Any) -> None:
    import socket

    assert app.delete_cache == ui.CACHE_CLEANUP_S == (3600, 3600)  # every hour, its files over an hour old
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        studio = FakeStudio()
        studio.results = tmp_path  # type: ignore[attr-defined]
        with pytest.raises(StudioError, match=f"cannot serve on 127.0.0.1:{port} .*pass --port N"):
            ui.serve(studio, "127.0.0.1", port, block=False)  # type: ignore[arg-type]


class BankStudio(FakeStudio):
    """A stand-in studio with a bank of two nodules, 6 and 12 mm."""

    def candidates(self, diameter: tuple[float, float], textures: list[int], malignancies: list[int]) -> list[Any]:
        bank = [SimpleNamespace(index=i, diameter_mm=d, texture=5, malignancy=3, case_id="A") for i, d in ((0, 6.0),
                (1, 12.0))]  # fmt: skip
        return [n for n in bank if diameter[0] <= n.diameter_mm <= diameter[1]]


def test_a_filter_change_keeps_the_chosen_nodule_and_an_empty_list_is_said() -> None:
    """Raising the smallest diameter replaced the chosen nodule by the first match without a word, so generate
    inserted another nodule than the one picked; filters that match nothing emptied the list silently, and generate
    then asked to choose a case that was open."""
    app = ui.build_app(BankStudio())
    fn = handler(app, "bank_choices")
    dropdown, said = fn.fn(5.0, 15.0, [], [], 1, "Opened A")  # #1 chosen, both match
    assert dropdown.value == 1 and isinstance(said, type(gr.skip()))  # the status line left as it was
    assert fn.fn(7.0, 15.0, [], [], 0, "")[0].value == 1  # the chosen one no longer matches: the first that does
    dropdown, said = fn.fn(14.0, 6.0, [], [], 1, "Opened A")
    assert dropdown.value is None and said.startswith("No bank nodule matches the filters: widen them")
    assert fn.fn(5.0, 15.0, [], [], None, said)[1] == "2 bank nodule(s) match."  # widened again: said, not left
    run = handler(app, "run")
    result = run.fn(toy_session("A"), [2, 5, 5], None, "bank", 0, True)
    assert "Choose a bank nodule first (an empty list: none matches the filters" in output(run, result, "status")
    assert "Choose a case first." in output(run, run.fn(None, [2, 5, 5], None, "bank", 0, True), "status")


def test_generate_and_undo_clear_the_downloads_they_make_stale(app: Any) -> None:
    """After an undo the downloads still offered the removed nodule, after a generate they lacked the new one."""
    s = toy_session("A")
    toy_edit(s)
    undo = handler(app, "run_undo")
    assert output(undo, undo.fn(s, [2, 5, 5], True), "files") is None
    assert isinstance(output(undo, undo.fn(s, [2, 5, 5], True), "files"), type(gr.skip()))  # nothing undone: kept
    run = handler(app, "run")
    assert isinstance(output(run, run.fn(s, [2, 5, 5], 3, "bank", 0, True), "files"), type(gr.skip()))  # refused


def test_downloads_are_served_from_a_random_folder_not_the_results(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole results/studio tree was served (allowed_paths) by guessable names: case and second. A download is
    now a link in a new random folder of Gradio's upload folder; such folders over an hour old go."""
    import os
    import time
    from pathlib import Path

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "upload"))
    export = tmp_path / "results/studio/A/20261207-101010"
    export.mkdir(parents=True)
    (export / "A_studio_ct.nii.gz").write_bytes(b"ct")
    old = tmp_path / "upload/download-old"
    old.mkdir(parents=True)
    os.utime(old, (time.time() - 2 * 3600,) * 2)
    served = [Path(p) for p in ui._servable([export / "A_studio_ct.nii.gz"])]
    assert served[0].read_bytes() == b"ct" and served[0].parent.parent == tmp_path / "upload"
    assert served[0].parent.name.startswith("download-") and len(served[0].parent.name) > len("download-") + 4
    assert not old.exists() and served[0].stat().st_ino == (export / "A_studio_ct.nii.gz").stat().st_ino


def test_a_port_out_of_range_is_refused_naming_the_option(app: Any, tmp_path: Any) -> None:
    studio = FakeStudio()
    studio.results = tmp_path  # type: ignore[attr-defined]
    with pytest.raises(StudioError, match=r"cannot serve on 127.0.0.1:70000 .*not one of 1-65535 \(pass --port N\)"):
        ui.serve(studio, "127.0.0.1", 70000, block=False)  # type: ignore[arg-type]
