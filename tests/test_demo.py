"""Gradio demo: every tab through gradio_client, errors as gr.Error, one headless-browser test."""
import importlib.util
import os
import shutil
import socket

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from diffusers_psld.models.classifier import TimeDependentClassifier  # noqa: E402
from diffusers_psld.pipelines import PSLDPipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("psld_demo_app", os.path.join(REPO, "demo", "app.py"))
app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    base = app.untrained_pipeline()
    clf = TimeDependentClassifier(in_channels=2, num_classes=10, block_out_channels=(8, 16), norm_num_groups=4)
    pipe = PSLDPipeline(unet=base.unet, scheduler=base.scheduler, classifier=clf)
    pipe.set_progress_bar_config(disable=True)
    demo = app.build_demo(pipe, "test model (untrained)")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_missing_model_falls_back_honestly(tmp_path):
    pipe, msg = app.load_pipeline(str(tmp_path / "nope"))
    assert "UNTRAINED" in msg and isinstance(pipe, PSLDPipeline)


def test_unconditional_tab(server):
    client = Client(server, verbose=False)
    out = client.predict("SSCS (SDE, PSLD Eq. 12)", 3, 1, 2, api_name="/unconditional")
    assert len(out) == 2 and os.path.exists(out[0]["image"])
    assert PIL.Image.open(out[0]["image"]).size == (app.DISPLAY_PX, app.DISPLAY_PX)


def test_guided_tab(server):
    client = Client(server, verbose=False)
    out = client.predict(3, 2.0, "Euler-Maruyama (SDE)", 3, 0, 1, api_name="/guided")
    assert len(out) == 1
    with pytest.raises(Exception, match=r"class label must be in \[0, 9\]"):
        client.predict(12, 1.0, "Euler-Maruyama (SDE)", 3, 0, 1, api_name="/guided")


def test_inpaint_tab(server, tmp_path):
    arr = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    path = tmp_path / "im.png"
    PIL.Image.fromarray(arr).save(path)
    client = Client(server, verbose=False)
    out = client.predict(handle_file(str(path)), None, "keep left half", "Probability-flow Heun (ODE)", 4, 0, 2,
                         api_name="/inpaint")
    assert len(out) == 2
    got = np.asarray(PIL.Image.open(out[0]["image"]).convert("L").resize((8, 8), PIL.Image.NEAREST))
    np.testing.assert_allclose(got[:, :4], arr[:, :4], atol=3)  # kept half (WebP is lossy by a little)
    tweedie = [m for m, v in app.INPAINT_METHODS.items() if v == "tweedie"][0]
    out = client.predict(handle_file(str(path)), None, "keep top half", "Euler-Maruyama (SDE)", 3, 0, 1, tweedie,
                         api_name="/inpaint")
    assert len(out) == 1
    got = np.asarray(PIL.Image.open(out[0]["image"]).convert("L").resize((8, 8), PIL.Image.NEAREST))
    np.testing.assert_allclose(got[:4], arr[:4], atol=3)


def test_limits_are_errors_not_tracebacks(server):
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="steps must be between 2|greater than maximum value 500"):
        client.predict("Euler-Maruyama (SDE)", 100000, 0, 1, api_name="/unconditional")
    with pytest.raises(Exception, match="batch size must be between 1|greater than maximum value 16"):
        client.predict("Euler-Maruyama (SDE)", 3, 0, 1000, api_name="/unconditional")
    with pytest.raises(Exception, match="Upload an image"):
        client.predict(None, None, "keep left half", "Euler-Maruyama (SDE)", 3, 0, 1, api_name="/inpaint")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_browser_generate_shows_image(server):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no `playwright install`)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server, wait_until="networkidle")
            page.locator("#generate-unconditional").click()
            img = page.locator("#gallery-unconditional img").first
            img.wait_for(state="visible", timeout=60000)
            assert img.evaluate("el => el.naturalWidth") > 0
        finally:
            browser.close()
