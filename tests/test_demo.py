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
    out = client.predict(app.SSCS, 3, 1, 2, api_name="/unconditional")
    assert len(out) == 2 and os.path.exists(out[0]["image"])
    assert PIL.Image.open(out[0]["image"]).size == (app.DISPLAY_PX, app.DISPLAY_PX)


def test_guided_tab(server):
    client = Client(server, verbose=False)
    out = client.predict(3, 2.0, "Euler-Maruyama (SDE)", 3, 0, 1, api_name="/guided")
    assert len(out) == 1
    with pytest.raises(Exception, match=r"class label must be between 0 and 9, got 12"):
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


def test_default_sampler_is_the_recommended_one_and_gddim_is_offered(server):
    from diffusers_psld.schedulers import GDDIMMultistepScheduler, PSLDScheduler

    base = app.untrained_pipeline()
    assert app.recommended_sampler(base) == app.GDDIM  # PSLD, Γ = 0.01 > 0
    cld = PSLDPipeline(unet=base.unet, scheduler=PSLDScheduler(gamma=0.0, nu=4.0))
    assert app.recommended_sampler(cld) == app.SSCS
    assert isinstance(app._scheduler(base, app.GDDIM), GDDIMMultistepScheduler)
    sscs = app._scheduler(cld, app.SSCS)
    assert sscs.config.striding == "quadratic"
    with pytest.raises(app.gr.Error, match="sampler: .*cannot sample this model"):
        app._scheduler(cld, app.GDDIM)  # gDDIM needs Γ > 0: a clear error, not a traceback
    client = Client(server, verbose=False)
    info = client.view_api(return_format="dict", print_info=False)
    params = info["named_endpoints"]["/unconditional"]["parameters"]
    sampler = [p for p in params if p["parameter_name"] == "sampler"][0]
    assert sampler["parameter_default"] == app.GDDIM
    out = client.predict(app.GDDIM, 4, 0, 1, api_name="/unconditional")
    assert len(out) == 1


def test_bad_seeds_and_uploads_name_the_input(server, tmp_path):
    """Issue #13 §8: seed 2**64, seed "abc" and a non-image upload are clear errors naming the input."""
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match=r"seed must be between 0 and 18446744073709551615, got 18446744073709551616"):
        client.predict(app.GDDIM, 3, 2**64, 1, api_name="/unconditional")
    with pytest.raises(Exception, match="seed must be an integer, got 'abc'"):
        client.predict(app.GDDIM, 3, "abc", 1, api_name="/unconditional")
    with pytest.raises(Exception, match="seed must be an integer, got 1.5"):
        client.predict(app.GDDIM, 3, 1.5, 1, api_name="/unconditional")
    with pytest.raises(Exception, match="seed must be between 0"):
        client.predict(app.GDDIM, 3, -1, 1, api_name="/unconditional")
    out = client.predict(app.GDDIM, 3, 2**64 - 1, 1, api_name="/unconditional")  # the largest valid seed works
    assert len(out) == 1
    with pytest.raises(Exception, match="class label must be an integer"):
        client.predict("x", 1.0, app.GDDIM, 3, 0, 1, api_name="/guided")
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(Exception, match="image: 'notes.png' is not an image"):
        client.predict(handle_file(str(bad)), None, "keep left half", app.GDDIM, 3, 0, 1, api_name="/inpaint")


def test_tweedie_inpainting_counts_in_the_cost_limit(server, tmp_path):
    path = tmp_path / "im.png"
    PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    tweedie = [m for m, v in app.INPAINT_METHODS.items() if v == "tweedie"][0]
    client = Client(server, verbose=False)
    steps = app.MAX_STEPS
    batch = app.MAX_COST // steps  # allowed as plain replacement ...
    assert batch * steps * app.TWEEDIE_COST > app.MAX_COST
    with pytest.raises(Exception, match=r"costs \d+ image-steps .*× 6 for Tweedie inpainting"):
        client.predict(handle_file(str(path)), None, "keep left half", app.GDDIM, steps, 0, batch, tweedie,
                       api_name="/inpaint")
    with pytest.raises(app.gr.Error, match="over the limit"):
        app._check(batch, steps, 0, app.TWEEDIE_COST, "Tweedie inpainting")
    assert app._check(batch, steps, 0) == (batch, steps, 0)  # ... the same request without Tweedie passes


def test_queue_is_bounded():
    base = app.untrained_pipeline()
    demo = app.build_demo(base, "t")
    assert demo._queue.max_size == app.MAX_QUEUE and app.MAX_QUEUE > 0


def test_limits_are_errors_not_tracebacks(server):
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="steps must be between 2|greater than maximum value 500"):
        client.predict("Euler-Maruyama (SDE)", 100000, 0, 1, api_name="/unconditional")
    with pytest.raises(Exception, match="batch size must be between 1|greater than maximum value 16"):
        client.predict("Euler-Maruyama (SDE)", 3, 0, 1000, api_name="/unconditional")
    with pytest.raises(Exception, match="image: upload an image"):
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
