"""The studio's page without a browser: the Blocks' event wiring and its handlers over a stand-in studio."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gradio as gr
import numpy as np
import pytest

from lungddpm.app import ui
from lungddpm.app.studio import SEED_MAX, CaseSession, Edit, StudioError, check_seed
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
    cases = ("A", "B")

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
    opened = fn.fn("A", True)
    assert session_output(fn, opened).case_id == "A"
    assert output(fn, opened, "plane-axial") is not None
    failed = fn.fn("B", True)
    assert session_output(fn, failed) is None  # not case A under case B's name
    assert all(output(fn, failed, f"plane-{p}") is None for p in ui.PLANES)
    assert output(fn, failed, "roi") is None and output(fn, failed, "files") is None
    assert "**Refused:** case B cannot be opened" in output(fn, failed, "status")


def test_opening_a_case_clears_the_previous_downloads(app: Any) -> None:
    fn = handler(app, "open_case")
    assert output(fn, fn.fn("A", True), "files") is None


def test_undo_clears_the_roi_panel(app: Any) -> None:
    s = toy_session("A")
    before = s.ct.copy()
    roi = np.zeros((4, 4, 4), np.int16)
    box = (slice(1, 3), slice(2, 6), slice(2, 6))
    edit = Edit({"bank_index": 7}, Geometry(spacing=(2.5,) * 3, origin=(0.0,) * 3), roi, roi, roi.astype(np.uint8),
                roi > 0, box, s.ct[box].copy(), s.labels[box].copy(), 0.1)  # fmt: skip
    s.ct[box] = 40
    s.edits.append(edit)
    fn = handler(app, "run_undo")
    result = fn.fn(s, [2, 5, 5], True)
    assert output(fn, result, "roi") is None
    assert np.array_equal(s.ct, before) and "Removed bank nodule #7" in output(fn, result, "status")


def test_the_seed_field_is_bounded_and_an_empty_one_is_refused(app: Any) -> None:
    seed = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "seed")
    assert (seed.minimum, seed.maximum, seed.precision) == (0, SEED_MAX, 0) and SEED_MAX == 2**62 - 1
    fn = handler(app, "run")
    for bad in (None, -1, 2**64):
        result = fn.fn(toy_session("A"), [2, 5, 5], 3, "bank", bad, True)
        assert "seed must be an integer 0..2**62-1" in output(fn, result, "status")
