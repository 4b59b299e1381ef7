"""The web page at / driven by headless Chromium against the real Serve app on 127.0.0.1.

Needs /usr/bin/chromium (Debian package `chromium`; `make test` installs it) and the playwright
Python package; no browser is downloaded.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dcm.config import load_config
from dcm.tiny import build_tiny_bundle

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def url(ray_cluster, tmp_path_factory):
    from pipelines.serve import start, stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bundle = build_tiny_bundle(tmp_path_factory.mktemp("ui") / "bundle", seed=0)
    cfg = load_config(preset="shapes-tiny").replace(
        **{
            "model.path": str(bundle),
            "serve.port": port,
            "serve.max_replicas": 1,
            "serve.max_steps": 200,
            "serve.job_store": str(bundle.parent / "jobs"),
        }
    )
    yield start(cfg)
    stop()


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page()
        browser.close()


def _submit(page, url: str, fmt: str, height: int = 32, width: int = 48, steps: int = 2) -> None:
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('#model option').length >= 1")
    page.fill("#prompt", "a green square slides right")
    page.fill("#steps", str(steps))
    page.fill("#num_frames", "5")
    page.fill("#height", str(height))
    page.fill("#width", str(width))
    page.select_option("#format", fmt)
    page.click("#go")


@pytest.mark.timeout(240)
def test_page_submits_a_job_shows_progress_and_plays_the_mp4(url, page):
    _submit(page, url, "mp4", steps=200)  # about a second of sampling: progress is visible
    page.wait_for_function(
        "document.querySelector('#status').textContent.startsWith('running: step')",
        timeout=60_000,
    )
    bar = page.evaluate(
        "() => { const p = document.querySelector('#progress'); return [p.hidden, p.max]; }"
    )
    assert bar == [False, 200]
    page.wait_for_function(
        "() => { const v = document.querySelector('video#output');"
        " return v && v.readyState >= 1 && v.videoWidth > 0; }",
        timeout=60_000,
    )
    size = page.evaluate(
        "() => { const v = document.querySelector('#output'); return [v.videoWidth, v.videoHeight]; }"
    )
    assert size == [48, 32]
    assert page.text_content("#status").startswith("done in")
    assert page.evaluate("document.querySelector('#progress').value") == 200
    meta = page.text_content("#meta")
    assert "job: " in meta and "model: default" in meta and "steps: 200" in meta
    assert "timings: " in meta and "denoise " in meta
    assert page.eval_on_selector_all("#model option", "els => els.map(e => e.value)") == ["default"]


@pytest.mark.timeout(240)
def test_page_shows_gifs_and_field_errors(url, page):
    _submit(page, url, "gif")
    page.wait_for_function(
        "() => { const i = document.querySelector('img#output'); return i && i.complete && i.naturalWidth > 0; }",
        timeout=60_000,
    )
    assert page.evaluate("document.querySelector('#output').naturalWidth") == 48

    _submit(page, url, "mp4", height=36)
    page.wait_for_function(
        "document.querySelector('#status').className === 'error'", timeout=30_000
    )
    status = page.text_content("#status")
    assert status.startswith("422") and "height=36" in status
