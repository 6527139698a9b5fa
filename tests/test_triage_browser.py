"""The static triage page in a real headless Chromium (skipped without chromium): it loads
from disk with no network, a real mouse click marks a verdict, the download is a valid
verdicts file that mendis score can carry, and zooming works.  The page served by Ray Serve
at /triage is tested in tests/distributed/test_triage_serve.py."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from browser import chromium_or_skip
from test_triage import EVIL_ID, scored_folder

from mendis_ray.triage.page import write_page
from mendis_ray.triage.verdicts import VERDICTS_FILE, merge_into, read_verdicts

pytestmark = pytest.mark.slow


@pytest.fixture
def browser(tmp_path):
    b = chromium_or_skip(tmp_path)
    yield b
    b.close()


PLOT_BOX = (
    "(() => { const r = document.getElementById('plot').getBoundingClientRect();"
    " return [r.x, r.y, r.width, r.height]; })()"
)


def _window(browser) -> list[float]:
    """The zoom window (from, to) shown in the page's inputs."""
    return browser.eval("['wl-lo', 'wl-hi'].map(k => +document.getElementById(k).value)")


def _wait_file(folder: Path, name: str, timeout: float = 20) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (folder / name).exists():
            return folder / name
        time.sleep(0.1)
    raise TimeoutError(f"{name} never appeared in {folder}")


def test_static_page_verdict_download_and_zoom(browser, tmp_path, sim):
    out = scored_folder(tmp_path / "scored", sim)
    page = write_page(out)
    browser.open(page.as_uri())
    assert browser.eval("document.title") != "pwned"  # the hostile id stayed text
    ids = browser.eval("[...document.querySelectorAll('#list li .sid')].map(e => e.textContent)")
    assert EVIL_ID in ids and len(ids) == 6
    # mark the Mg-rich star interesting with a real mouse click
    i = ids.index("mg_rich")
    browser.click(f'#list li[data-index="{i}"]')
    assert browser.eval("document.body.dataset.current") == "mg_rich"
    browser.click('.verdict[data-verdict="interesting"]')
    assert (
        browser.eval("document.querySelector('.verdict.active').dataset.verdict") == "interesting"
    )
    assert "1 verdict(s) kept in this browser" in browser.eval(
        "document.getElementById('save-status').textContent"
    )
    # zoom: drag across the plot, then a click on feature 1 zooms around it
    lo0, hi0 = _window(browser)
    r = browser.eval(PLOT_BOX)
    browser.drag(r[0] + 0.3 * r[2], r[0] + 0.5 * r[2], r[1] + 0.3 * r[3])
    lo, hi = _window(browser)
    assert lo0 < lo < hi < hi0 and hi - lo < 0.4 * (hi0 - lo0)
    browser.click("#features tbody tr")
    wl = browser.eval("+document.querySelector('#features tbody tr td:nth-child(2)').textContent")
    lo, hi = _window(browser)
    assert lo < wl < hi and hi - lo < 60
    shot = browser.screenshot(tmp_path / "triage.png")
    if os.environ.get("MENDIS_TRIAGE_SCREENSHOT"):
        shutil.copy(shot, os.environ["MENDIS_TRIAGE_SCREENSHOT"])
    # the download is a verdicts file; merged into the folder, a rebuilt page shows it
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.allow_downloads(downloads)
    browser.click("#download")
    got = read_verdicts(_wait_file(downloads, "verdicts.json"))
    assert {k: v["verdict"] for k, v in got.items()} == {"mg_rich": "interesting"}
    merge_into(out / VERDICTS_FILE, got)
    browser.eval("localStorage.clear()")
    browser.open(write_page(out).as_uri())
    browser.click(f'#list li[data-index="{i}"]')
    assert (
        browser.eval("document.querySelector('.verdict.active').dataset.verdict") == "interesting"
    )
