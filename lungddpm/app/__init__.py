"""The interactive nodule studio (``lungddpm app``): a local Gradio app over the workflow's results.

:mod:`.studio` holds the logic (no web framework), :mod:`.views` draws the planes, :mod:`.ui` is the page."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def launch(cfg: Any, workdir: Path, host: str | None = None, port: int = 7860, threads: int | None = None) -> Any:
    """Load the studio of ``workdir`` and serve it (blocking). Gradio's cache goes under ``results/studio/`` and its
    telemetry is off, so that nothing is fetched or sent over the network; set before gradio is imported."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(workdir).resolve() / "results" / "studio" / ".gradio"))
    from .studio import Studio
    from .ui import serve

    return serve(Studio(cfg, Path(workdir), threads), host, port)
