from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_ruff_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_ruff_formatted() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(REPO)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
