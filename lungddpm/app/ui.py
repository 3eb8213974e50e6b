"""The studio's web page (Gradio): open a case, click a site on any of three linked planes (or ask for a random
valid one), pick a bank nodule, generate, undo, download. Handlers are thin: the work is :mod:`.studio`'s."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from ..errors import LungDDPMError
from .checks import SEED_MAX
from .studio import CaseSession, Studio, StudioError
from .views import PLANES, click_to_index, render_plane, roi_panel

log = logging.getLogger(__name__)

TEXTURE_NAMES = {1: "1 ground-glass", 2: "2", 3: "3 part-solid", 4: "4", 5: "5 solid"}
EDIT_COLUMNS = ["#", "bank nodule", "diameter mm", "texture", "site (k, i, j)", "mean HU", "seconds"]
# every handler that reads or changes a CaseSession (or the shared model) runs in this one queue, one at a time,
# across all tabs: Gradio gives each event its own queue otherwise, so a case opened during a generate would be
# overwritten by the generate's session when it returns
ONE_AT_A_TIME: dict[str, Any] = {"concurrency_id": "studio", "concurrency_limit": 1}
CACHE_CLEANUP_S = (3600, 3600)  # Gradio's delete_cache: every hour, its cached files older than an hour
KEEP_CASES = 3  # cases a tab keeps with their inserted nodules when another is opened (each holds its whole CT)


def nodule_label(n: Any) -> str:
    """Dropdown text of a bank nodule."""
    return f"#{n.index}  {n.diameter_mm:.1f} mm  texture {n.texture}  malignancy {n.malignancy}  ({n.case_id})"


def _planes(studio_session: CaseSession | None, cursor: list[int], show_lung: bool) -> list[np.ndarray | None]:
    if studio_session is None:
        return [None, None, None]
    spacing = studio_session.geometry.spacing
    return [render_plane(studio_session.ct, studio_session.labels, p, cursor, spacing, show_lung) for p in PLANES]


def _edits_table(session: CaseSession | None) -> list[list[Any]]:
    if session is None:
        return []
    return [
        [n + 1, e.record["bank_index"], e.record["diameter_mm"], e.record["texture_requested"],
         str(tuple(e.record["site_index_kij"])), e.record["nodule_mean_hu"], round(e.seconds, 2)]
        for n, e in enumerate(session.edits)
    ]  # fmt: skip


NO_BANK_NODULE = "No bank nodule matches the filters"
NO_MATCH = "widen them (the smallest diameter at most the largest, fewer textures or malignancies)"


def _choose(session: CaseSession | None) -> str:
    if session is None:
        return "Choose a case first."
    return f"Choose a bank nodule first (an empty list: none matches the filters; {NO_MATCH})."


def _servable(paths: list[Path]) -> list[str]:
    """Links (copies across file systems) of ``paths`` in a new folder of a random name in Gradio's upload folder,
    which the page serves the downloads from; the studio's results folder itself is not served. Such folders over
    an hour old go, as Gradio's cache does (:data:`CACHE_CLEANUP_S`)."""
    root = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("download-*"):
        if time.time() - old.stat().st_mtime > CACHE_CLEANUP_S[1]:
            shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix="download-", dir=root))
    for p in paths:
        try:
            os.link(p, stage / p.name)
        except OSError:
            shutil.copy2(p, stage / p.name)
    return [str(stage / p.name) for p in paths]


def build_app(studio: Studio) -> Any:
    """The Gradio Blocks app over ``studio`` (one :class:`CaseSession` per browser tab, in ``gr.State``)."""
    insert = studio.cfg.raw["lesion"]["insert"]
    lo, hi = (float(v) for v in insert["diameter_mm"])
    # Gradio copies each download into its cache (results/studio/.gradio): cleared hourly of files over an hour old,
    # and whole at a restart
    with gr.Blocks(title="lungddpm nodule studio", analytics_enabled=False, delete_cache=CACHE_CLEANUP_S) as app:
        session = gr.State(None)
        kept = gr.State({})  # case -> the tab's session of a case left with inserted nodules, until it is reopened
        cursor = gr.State([0, 0, 0])
        gr.Markdown(
            "## lungddpm nodule studio\nOpen a case, click a site in the lung on any plane (or ask for a random "
            "site), pick a nodule from the bank and generate it with the lesion model. Lung is tinted blue, "
            "nodules red; the yellow cross is the site."
        )
        with gr.Row():
            case = gr.Dropdown(list(studio.cases), label="case", value=None, elem_id="case")
            show_lung = gr.Checkbox(True, label="show the lung")
        with gr.Row():
            views = [gr.Image(label=p, interactive=False, elem_id=f"plane-{p}", format="png") for p in PLANES]
        status = gr.Markdown("Choose a case.", elem_id="status")
        with gr.Row():
            with gr.Column():
                smallest = gr.Slider(lo, hi, value=lo, step=0.5, label="smallest diameter (mm)")
                diameter = gr.Slider(lo, hi, value=hi, step=0.5, label="largest diameter (mm)")
                textures = gr.CheckboxGroup(list(TEXTURE_NAMES.values()), label="bank textures (none = all)")
                malignancies = gr.CheckboxGroup([str(m) for m in range(1, 6)], label="bank malignancies (none = all)")
                nodule = gr.Dropdown([], label="bank nodule", elem_id="nodule")
            with gr.Column():
                texture = gr.Dropdown(list(studio.texture_requests), value=insert["texture"], label="texture")
                # no minimum / maximum here: Gradio would refuse such a seed in a toast, not the status line
                seed = gr.Number(0, precision=0, label=f"seed (0..{SEED_MAX})", elem_id="seed")
                with gr.Row():
                    random_site = gr.Button("random site", elem_id="random-site")
                    generate = gr.Button("generate", variant="primary", elem_id="generate")
                    undo = gr.Button("undo", elem_id="undo")
                    download = gr.Button("download NIfTI", elem_id="download")
                files = gr.File(label="downloads", file_count="multiple", interactive=False, elem_id="files")
        roi = gr.Image(label="ROI: before | after | after with the edited label (axial, coronal)", interactive=False,
                       elem_id="roi", format="png")  # fmt: skip
        edits = gr.Dataframe(headers=EDIT_COLUMNS, value=[], label="inserted nodules", interactive=False)

        def bank_choices(
            d_min: float, d_max: float, tex: list[str], mal: list[str], current: int | None, shown: str
        ) -> Any:
            """-> the nodule list (the chosen one kept while it still matches: it was replaced by the first match
            without a word), and the status line when none matches, or when it said so and some match again."""
            codes = [int(t.split()[0]) for t in tex]
            found = studio.candidates((float(d_min), float(d_max)), codes, [int(m) for m in mal])
            choices = [(nodule_label(n), n.index) for n in found]
            keep = current if current in [i for _, i in choices] else (choices[0][1] if choices else None)
            if not choices:
                said = f"{NO_BANK_NODULE}: {NO_MATCH}"
            else:
                said = (
                    f"{len(choices)} bank nodule(s) match." if (shown or "").startswith(NO_BANK_NODULE) else gr.skip()
                )
            return gr.Dropdown(choices=choices, value=keep), said

        def open_case(case_id: str, lung: bool, old: CaseSession | None, held: dict) -> tuple[Any, ...]:
            """-> session, kept sessions, cursor, planes, status, table, ROI panel, downloads. The case left keeps
            its inserted nodules (in ``held``) until it is opened again."""
            if old is not None and old.edits and old.case_id != case_id:
                held = {**{c: k for c, k in held.items() if c != old.case_id}, old.case_id: old}
            back = held.get(case_id)
            others = [c for c in held if c != case_id]
            dropped = others[: max(0, len(others) - KEEP_CASES)]  # a whole CT each: the oldest go
            held = {c: held[c] for c in others if c not in dropped}
            note = "".join(f" {c} keeps its {len(k.edits)} inserted nodule(s): open it again to go on or download."
                           for c, k in held.items())  # fmt: skip
            if dropped:
                note += f" Dropped the nodules of {', '.join(dropped)}: a tab keeps those of {KEEP_CASES} other cases."
            if back is not None:
                s, msg = back, f"Back to {case_id}, with the {len(back.edits)} nodule(s) inserted before."
            else:
                try:
                    s = studio.open_case(case_id)
                except StudioError as exc:  # no case is loaded, rather than the previous one under the new name
                    return (None, held, [0, 0, 0], *_planes(None, [0, 0, 0], lung), f"**Refused:** {exc}{note}", [],
                            None, None)  # fmt: skip
                msg = f"Opened {case_id}: {s.ct.shape[0]} slices of {s.ct.shape[1]}x{s.ct.shape[2]}. Click a site."
            lung_idx = np.argwhere(s.labels == 1)
            c = [int(v) for v in np.round(lung_idx.mean(axis=0))] if lung_idx.size else [v // 2 for v in s.ct.shape]
            return s, held, c, *_planes(s, c, lung), msg + note, _edits_table(s), None, None

        def clicked(plane: str) -> Any:
            def handler(s: CaseSession | None, c: list[int], lung: bool, evt: gr.SelectData) -> tuple[Any, ...]:
                if s is None:
                    return c, *_planes(s, c, lung), "Choose a case first."
                x, y = evt.index
                c = list(click_to_index(plane, x, y, c, s.ct.shape, s.geometry.spacing))
                label = {0: "outside the lung", 1: "lung", 2: "a nodule"}[int(s.labels[tuple(c)])]
                return c, *_planes(s, c, lung), f"Site (k, i, j) = {tuple(c)}: {label}."

            return handler

        def pick_random(s: CaseSession | None, c: list[int], idx: int | None, sd: float | None, lung: bool) -> tuple:
            if s is None or idx is None:
                return c, *_planes(s, c, lung), _choose(s)
            try:
                c = list(studio.random_site(s, studio.nodule(idx), sd))
            except StudioError as exc:
                return c, *_planes(s, c, lung), f"**Refused:** {exc}"
            return c, *_planes(s, c, lung), f"Random valid site (k, i, j) = {tuple(c)}. Press generate."

        def run(s: CaseSession | None, c: list[int], idx: int | None, tex: str, sd: float | None, lung: bool,
                progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # fmt: skip
            if s is None or idx is None:
                return s, *_planes(s, c, lung), _choose(s), gr.skip(), _edits_table(s), gr.skip()
            try:
                ins = studio.check_site(s, c, studio.nodule(idx), tex, sd)
                progress(0.0, desc="generating")
                step = max(1, int(studio.cfg.raw["lesion"]["sample"]["steps"]) // 4)  # a few updates, not one per step
                edit = studio.generate(
                    s, ins, lambda i, n: progress(i / n, desc=f"step {i}/{n}") if i % step == 0 else None
                )
            except StudioError as exc:
                return s, *_planes(s, c, lung), f"**Refused:** {exc}", gr.skip(), _edits_table(s), gr.skip()
            r = edit.record
            msg = (f"Inserted bank nodule #{r['bank_index']} ({r['diameter_mm']} mm, {r['texture_requested']}) at "
                   f"{tuple(c)} in {edit.seconds:.2f} s: mean {r['nodule_mean_hu']} HU, "
                   f"{r['native_voxels_changed']} native voxels changed.")  # fmt: skip
            panel = roi_panel(edit.roi_before, edit.roi_after, edit.roi_layout, edit.roi_nodule)
            return s, *_planes(s, c, lung), msg, panel, _edits_table(s), None  # the downloads lack this nodule

        def run_undo(s: CaseSession | None, c: list[int], lung: bool) -> tuple[Any, ...]:
            edit = s.undo() if s is not None else None
            msg = "Nothing to undo." if edit is None else f"Removed bank nodule #{edit.record['bank_index']}."
            # None: the ROI panel showed the removed edit, and the downloads hold it
            return s, *_planes(s, c, lung), msg, None, _edits_table(s), gr.skip() if edit is None else None

        def run_download(s: CaseSession | None) -> tuple[Any, str]:
            if s is None:
                return None, "Choose a case first."
            try:
                paths = studio.export(s)
                served = _servable(list(paths.values()))
            except StudioError as exc:
                return None, f"**Refused:** {exc}"
            except (LungDDPMError, OSError) as exc:  # a full disk, a folder not writable: said here, not as a popup
                return None, f"**Not written:** {exc}"
            return served, f"Wrote {paths['ct'].parent}."

        filters = [smallest, diameter, textures, malignancies]
        for f in filters:
            f.change(bank_choices, [*filters, nodule, status], [nodule, status])
        app.load(bank_choices, [*filters, nodule, status], [nodule, status])
        case.change(open_case, [case, show_lung, session, kept],
                    [session, kept, cursor, *views, status, edits, roi, files], **ONE_AT_A_TIME)  # fmt: skip
        show_lung.change(lambda s, c, lung: _planes(s, c, lung), [session, cursor, show_lung], views, **ONE_AT_A_TIME)
        for plane, view in zip(PLANES, views):
            view.select(clicked(plane), [session, cursor, show_lung], [cursor, *views, status], **ONE_AT_A_TIME)
        random_site.click(pick_random, [session, cursor, nodule, seed, show_lung], [cursor, *views, status],
                          **ONE_AT_A_TIME)  # fmt: skip
        # the progress bar on the ROI panel alone: an animated tracker on every output costs the browser CPU that
        # the sampler shares on a laptop
        generate.click(run, [session, cursor, nodule, texture, seed, show_lung], [session, *views, status, roi, edits,
                       files], show_progress_on=[roi], **ONE_AT_A_TIME)  # fmt: skip
        undo.click(run_undo, [session, cursor, show_lung], [session, *views, status, roi, edits, files],
                   **ONE_AT_A_TIME)  # fmt: skip
        download.click(run_download, [session], [files, status], **ONE_AT_A_TIME)
    return app


def serve(studio: Studio, host: str | None = None, port: int = 7860, block: bool = True) -> Any:
    """Start the app on ``host`` (default 127.0.0.1: this machine only; on a Hugging Face Space the platform's
    ``GRADIO_SERVER_NAME``) without any network fetch: system fonts, no share link; :func:`lungddpm.app.launch`
    turns telemetry off before gradio is imported."""
    host = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this machine on port %d can use the studio", host, port)
    font = ["ui-sans-serif", "system-ui", "sans-serif"]
    theme = gr.themes.Default(font=font, font_mono=["ui-monospace", "monospace"])
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)  # the session handlers share one queue (ONE_AT_A_TIME): the CPU is shared
    try:
        # no allowed_paths: results/studio is not served, so nobody fetches another user's download by its name
        return app.launch(server_name=host, server_port=port, share=False, theme=theme, prevent_thread_lock=not block,
                          show_error=True, inbrowser=False)  # fmt: skip
    except (OSError, OverflowError) as exc:  # Gradio: "Cannot find empty port in range"; bind(): port must be 0-65535
        raise StudioError(
            f"cannot serve on {host}:{port} ({exc}): another program holds the port, or it is not one of 1-65535 "
            "(pass --port N), or the address is not this machine's (--host)"
        ) from exc
