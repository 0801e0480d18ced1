"""Headless Chromium: register a hospital, approve it, find the round's metrics plot."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from portal_helpers import ADMIN_EMAIL, ADMIN_PASSWORD, make_settings, plain_update, sha

from fedcrypt.portal.app import create_app
from fedcrypt.portal.services import accounts

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)",
    ),
]


@pytest.fixture
def live_url(tmp_path: Path) -> Iterator[str]:
    """The portal served by uvicorn in a thread on a free 127.0.0.1 port."""
    import uvicorn

    app = create_app(make_settings(tmp_path, tick_interval_s=0.5))
    accounts.create_admin(app.state.portal, email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_register_approve_and_see_the_metrics_plot(live_url: str, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    url = live_url
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            hospital = browser.new_context(viewport={"width": 1280, "height": 900})
            admin = browser.new_context(viewport={"width": 1280, "height": 900})
            hp, ap = hospital.new_page(), admin.new_page()

            # a hospital registers
            hp.goto(f"{url}/register")
            hp.fill("input[name=name]", "Hôpital Nord")
            hp.fill("input[name=email]", "it@nord.example")
            hp.fill("input[name=password]", "hospital-pass-1")
            hp.fill("input[name=password_confirm]", "hospital-pass-1")
            hp.click("main button[type=submit]")
            hp.wait_for_selector("text=awaiting approval")

            # the admin signs in and approves it
            ap.goto(f"{url}/login")
            ap.fill("input[name=email]", ADMIN_EMAIL)
            ap.fill("input[name=password]", ADMIN_PASSWORD)
            ap.click("main button[type=submit]")
            ap.wait_for_url(f"{url}/federations")
            ap.goto(f"{url}/admin/hospitals")
            ap.click("button[aria-label='Approve Hôpital Nord']")
            ap.wait_for_selector("#hospitals >> text=Hôpital Nord")
            assert "approved" in ap.inner_text("#hospitals")

            # the admin creates a plain federation in the browser
            state = {"w": torch.zeros(2, 3)}
            model_file = tmp_path / "initial.pt"
            torch.save(state, model_file)
            ap.goto(f"{url}/federations/new")
            ap.fill("input[name=name]", "browser-demo")
            ap.fill("input[name=model]", "mlp")
            ap.fill("textarea[name=dataset_description]", "WDBC (tabular)")
            ap.check("input[name=protection][value=plain]")
            ap.set_input_files("input[name=initial_model]", str(model_file))
            ap.fill("input[name=model_size]", "6")
            ap.fill("input[name=quorum]", "1")
            ap.fill("input[name=round_deadline_minutes]", "10")
            ap.fill("input[name=num_rounds]", "2")
            ap.click("main button[type=submit]")
            ap.wait_for_selector("h1 >> text=browser-demo")
            fed_url = ap.url

            # the hospital signs in, creates its API token, and takes part by API
            hp.goto(f"{url}/login")
            hp.fill("input[name=email]", "it@nord.example")
            hp.fill("input[name=password]", "hospital-pass-1")
            hp.click("main button[type=submit]")
            hp.wait_for_url(f"{url}/federations")
            hp.goto(f"{url}/account")
            hp.click("text=Create a new API token")
            token = hp.inner_text("#api-token").strip()
            auth = {"Authorization": f"Bearer {token}"}
            fid = fed_url.rstrip("/").rsplit("/", 1)[1]
            blob = plain_update(np.arange(6.0), 40)
            r = httpx.put(
                f"{url}/api/v1/federations/{fid}/rounds/1/update",
                content=blob,
                headers={**auth, "X-Content-SHA256": sha(blob)},
            )
            assert r.status_code == 200, r.text
            for _ in range(100):
                got = httpx.get(f"{url}/api/v1/federations/{fid}/rounds/1", headers=auth).json()
                if got["status"] == "aggregated":
                    break
                time.sleep(0.1)
            r = httpx.post(
                f"{url}/api/v1/federations/{fid}/rounds/1/metrics",
                json={"loss": 0.21, "accuracy": 0.93, "auc": 0.97, "num_examples": 23},
                headers=auth,
            )
            assert r.status_code == 201, r.text

            # the federation page shows the round's metrics plot
            ap.goto(fed_url)
            plot = ap.wait_for_selector("img#metrics-plot")
            assert plot is not None
            ap.wait_for_function(
                "() => document.querySelector('img#metrics-plot').naturalWidth > 0"
            )
            assert "0.9300" in ap.inner_text("#metrics")
            assert "Hôpital Nord" in ap.inner_text("#participants")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "portal-federation.png"
            ap.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
