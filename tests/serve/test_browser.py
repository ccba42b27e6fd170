"""`pixart serve` in a real headless Chromium: the page generates 2 images from the demo, the gallery fills, and the
PNGs written equal `pixart sample`'s with the same settings, pixel for pixel.

Needs Debian's chromium (`.ci/run` installs it) and playwright (the dev extra). Skipped where either is missing,
except where PIXART_REQUIRE_BROWSER=1 (CI), so that a missing browser fails rather than passes unseen.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pixart_cli.cli import app
from tests.serve.conftest import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("PIXART_REQUIRE_BROWSER") == "1"
# As a sandboxed root process on a closed network: no background connections to Google's hosts.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def page():
    if not REQUIRED:
        pytest.importorskip("playwright", reason="needs playwright (pip install -e '.[dev]')")
        if CHROMIUM is None:
            pytest.skip("needs chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


def test_the_page_generates_two_images_equal_to_pixart_sample(server: Server, page, tmp_path):
    page.goto(server.url)
    page.locator("#prompts textarea").fill("a red circle to the left of a blue square")
    page.locator("#steps input").fill("6")
    page.locator("#seed input").fill("1234567")  # a seed no other test of this server uses
    page.locator("#count input[type=number]").fill("2")
    page.locator("#count input[type=number]").press("Enter")
    page.locator("#generate").click()
    status = page.locator("#status")
    status.filter(has_text="2 image(s)").wait_for(timeout=180_000)
    folder = Path(re.search(r"in (\S+)$", status.inner_text().strip()).group(1).strip("`"))
    assert folder.parent == server.output
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == ["p00000-s1234567.png", "p00000-s1234568.png"]
    # The gallery shows them (newest first), and the reproduce line names this folder.
    gallery = page.locator("#gallery img")
    gallery.first.wait_for(timeout=30_000)
    sources = [gallery.nth(i).get_attribute("src") or "" for i in range(gallery.count())]
    assert all(any(f.name in src for src in sources) for f in files), sources
    reproduce = page.locator("#reproduce textarea").input_value()
    assert folder.name in reproduce
    if shot := os.environ.get("PIXART_SCREENSHOT"):  # docs/img/serve.png is made this way
        page.locator("#gallery img").first.click()
        page.wait_for_timeout(500)
        page.screenshot(path=shot, full_page=True)
    # The page's reproduce line, run into another folder, writes the same pixels and the same records.
    args = shlex.split(reproduce)
    assert args[:2] == ["pixart", "sample"] and args[args.index("-o") + 1] == str(folder)
    args[args.index("-o") + 1] = str(tmp_path / "cli")
    assert CliRunner().invoke(app, args[1:]).exit_code == 0
    for path in files:
        ours, theirs = Image.open(path), Image.open(tmp_path / "cli" / path.name)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
        assert json.loads(ours.info["pixart"]) == json.loads(theirs.info["pixart"])


def test_cancel_on_the_page_stops_the_request_and_keeps_what_was_made(server: Server, page):
    page.goto(server.url)
    page.locator("#prompts textarea").fill("a green triangle")
    page.locator("#steps input").fill("400")
    page.locator("#count input[type=number]").fill("8")
    page.locator("#count input[type=number]").press("Enter")
    page.locator("#generate").click()
    page.wait_for_timeout(1500)
    page.locator("#cancel").click()
    status = page.locator("#status")
    status.filter(has_text="cancelled").wait_for(timeout=120_000)
    text = status.inner_text().strip()
    if "in " in text:  # it had started: the images it finished are there, with their records
        folder = Path(re.search(r"in (\S+)$", text).group(1).strip("`"))
        assert len(list(folder.glob("*.png"))) < 8
