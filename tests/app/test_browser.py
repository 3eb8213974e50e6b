"""The studio in a real browser: Debian's chromium driven by Playwright against ``lungddpm app`` on the CI-size
results. No browser on the machine is a failure, not a skip (the README's test command installs chromium)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import ndimage as ndi
from support import THREADS

from lungddpm.config import load_config
from lungddpm.io import read_json, read_volume
from lungddpm.preprocessing.layout import NODULE, ball
from lungddpm.synthesis.paste import native_box, nearest_in_box

STATUS = "document.querySelector('#status').innerText"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app_url(demo_workflow: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``lungddpm app`` serving the CI-size workflow (its merged config written as one file)."""
    tmp = tmp_path_factory.mktemp("app")
    cfg = load_config(demo_workflow / "config/config.yaml", yaml.safe_load((demo_workflow / "ci.yaml").read_text()))
    (tmp / "studio.yaml").write_text(yaml.safe_dump(cfg.raw))
    port = _free_port()
    cmd = [sys.executable, "-m", "lungddpm.cli", "--configfile", str(tmp / "studio.yaml"), "app",
           "--workdir", str(demo_workflow), "--port", str(port), "--threads", str(THREADS)]  # fmt: skip
    log = open(tmp / "app.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise AssertionError(f"lungddpm app exited with {proc.returncode}:\n{(tmp / 'app.log').read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"lungddpm app did not answer in 120 s:\n{(tmp / 'app.log').read_text()}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_place_a_nodule_in_the_browser_and_download_it(app_url: str, demo_workflow: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("no chromium on this machine: apt-get install --no-install-recommends chromium (see README)")
    case = sorted(p.name for p in (demo_workflow / "results/preprocessed").iterdir() if p.is_dir())[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1800}, accept_downloads=True)
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(app_url, wait_until="load")
        page.locator("#case input").click()
        page.get_by_role("option", name=case, exact=True).click()
        page.wait_for_function(f"{STATUS}.includes('Opened')", timeout=60_000)
        loaded = "(() => { const i = document.querySelector('#plane-axial img'); return i && i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0; })()"  # noqa: E501
        page.wait_for_function(loaded, timeout=30_000)
        box = page.locator("#plane-axial img").bounding_box()
        assert box is not None
        page.locator("#plane-axial img").click(position={"x": 2, "y": 2})  # the corner: air
        page.wait_for_function(f"{STATUS}.includes('outside the lung')", timeout=30_000)
        page.locator("#generate").click()  # an invalid site is refused with a reason, and the app stays up
        page.wait_for_function(f"{STATUS}.includes('Refused')", timeout=60_000)
        page.locator("#random-site").click()
        page.wait_for_function(f"{STATUS}.includes('Random valid site')", timeout=60_000)
        t0 = time.perf_counter()
        page.locator("#generate").click()
        page.wait_for_function(f"{STATUS}.includes('Inserted')", timeout=120_000)
        seconds = time.perf_counter() - t0
        settled = "(() => { const i = document.querySelector('#roi img'); const s = document.querySelector('#roi [data-testid=status-tracker]'); return i && i.complete && (!s || s.classList.contains('hide')); })()"  # noqa: E501
        page.wait_for_function(settled, timeout=30_000)
        page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
        print(f"click to result: {seconds:.2f} s; screenshot {tmp_path / 'studio.png'}")
        page.locator("#download").click()
        page.wait_for_function(f"{STATUS}.includes('Wrote')", timeout=60_000)
        got = {}
        for suffix in ("_ct.nii.gz", "_label.nii.gz", "_s0_layout.nii.gz", "_studio.json"):
            with page.expect_download() as download:
                page.locator(f'#files a[download$="{suffix}"]').click()
            got[suffix] = tmp_path / download.value.suggested_filename
            download.value.save_as(got[suffix])
        browser.close()
    assert (tmp_path / "studio.png").stat().st_size > 10_000
    assert requests and all(u.startswith(app_url) or u.startswith(("data:", "blob:")) for u in requests), [
        u for u in requests if not u.startswith(app_url)
    ]  # offline: nothing but the app itself is fetched

    from lungddpm.app.studio import Studio

    cfg = load_config(demo_workflow / "config/config.yaml", yaml.safe_load((demo_workflow / "ci.yaml").read_text()))
    original = Studio(cfg, demo_workflow, threads=1).open_case(case)
    ct, geometry = read_volume(got["_ct.nii.gz"])
    labels, _ = read_volume(got["_label.nii.gz"])
    assert geometry.same_grid(original.geometry) and ct.shape == original.ct.shape
    # the label gained a component (26-connected: a small nodule at the ROI spacing may touch only diagonally)
    cube = np.ones((3, 3, 3), bool)
    assert ndi.label(labels == NODULE, cube)[1] == ndi.label(original.labels == NODULE, cube)[1] + 1
    # and the voxels outside the generated region (the nodule + margin, on the native grid) are unchanged
    layout, roi = read_volume(got["_s0_layout.nii.gz"])
    generated = ndi.binary_dilation(layout == NODULE, structure=ball(5.0 / 2.5))  # CI: margin 5 mm, 2.5 mm ROIs
    box = native_box(original.source.grid, ct.shape, roi, 16)
    region = np.zeros(ct.shape, bool)
    region[box.slices] = nearest_in_box(box, ndi.binary_dilation(generated, structure=np.ones((3, 3, 3), bool)))
    changed = ct != original.ct
    assert changed.any() and not changed[~region].any()
    prov = read_json(got["_studio.json"])
    # the download folder itself is not served (it was, with the whole results/studio tree, by guessable names)
    (written,) = (demo_workflow / "results/studio" / case).glob(f"*/{case}_studio_ct.nii.gz")
    with pytest.raises(urllib.error.HTTPError, match="HTTP Error 403"):
        urllib.request.urlopen(f"{app_url}gradio_api/file={written}", timeout=10)
    assert prov["source_case"] == case and prov["tool"] == "lungddpm app" and len(prov["sites"]) == 1
    assert 0 < int(changed.sum()) <= prov["sites"][0]["native_voxels_changed"]  # rewritten; some keep their HU
