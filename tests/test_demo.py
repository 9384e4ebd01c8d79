"""Gradio demo: every tab through gradio_client, errors as gr.Error, one headless-browser test."""
import importlib.util
import json
import os
import shutil
import socket

import numpy as np
import PIL.Image
import pytest

from diffusers_psld.denoisers import RecipeDenoiser
import torch

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from diffusers_psld import NonFiniteError, PSLDImg2ImgPipeline, PSLDScheduler  # noqa: E402
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


def _serve(pipe, status):
    demo = app.build_demo(pipe, status)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


def _classifier(in_channels=2):
    torch.manual_seed(1)
    return TimeDependentClassifier(in_channels=in_channels, num_classes=10, block_out_channels=(8, 16), norm_num_groups=4)


@pytest.fixture(scope="module")
def server():
    base = app.untrained_pipeline()
    pipe = PSLDPipeline(unet=base.unet, scheduler=base.scheduler, classifier=_classifier())
    pipe.set_progress_bar_config(disable=True)
    demo, url = _serve(pipe, "test model (untrained)")
    yield url
    demo.close()


@pytest.fixture(scope="module")
def nan_server():
    """A model whose UNet outputs NaN: every tab must answer with the pipeline's NonFiniteError as a gr.Error."""
    base = app.untrained_pipeline()
    with torch.no_grad():
        base.unet.conv_out.bias.fill_(float("nan"))
    demo, url = _serve(base, "NaN model")
    yield url
    demo.close()


@pytest.fixture(scope="module")
def suff_dir(tmp_path_factory):
    """A tiny saved pipeline with prediction_type="sufficient_epsilon" (C-channel UNet), input preconditioning and a
    classifier, built like tests/test_pipeline_prediction_type.py's save/load test."""
    from diffusers import UNet2DModel

    sched = PSLDScheduler(prediction_type="sufficient_epsilon", input_preconditioning=True, sigma_data=0.6)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, layers_per_block=1)
    path = tmp_path_factory.mktemp("suff") / "pipe"
    PSLDPipeline(unet=unet, scheduler=sched, classifier=_classifier()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def suff_server(suff_dir):
    pipe, status = app.load_pipeline(suff_dir)
    demo, url = _serve(pipe, status)
    yield url
    demo.close()


@pytest.fixture
def image_file(tmp_path):
    arr = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    path = tmp_path / "im.png"
    PIL.Image.fromarray(arr).save(path)
    return str(path)


def test_missing_model_falls_back_honestly(tmp_path):
    pipe, msg = app.load_pipeline(str(tmp_path / "nope"))
    assert "UNTRAINED" in msg and isinstance(pipe, PSLDPipeline)
    info = app.model_info(pipe)
    assert 'prediction_type="epsilon"' in info and "PSLD (Γ = 0.01" in info and "preconditioning" not in info
    out = app._run(pipe, app.recommended_sampler(pipe), 1, 3, 0)
    assert len(out) == 1


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
    assert app.recommended_sampler(base) == app.VP_BRIDGE  # the VP sampler, through the bridge for PSLD / CLD
    cld = PSLDPipeline(unet=base.unet, scheduler=PSLDScheduler(gamma=0.0, nu=4.0))
    assert app.recommended_sampler(cld) == app.VP_BRIDGE
    vp = app._scheduler(cld, app.VP_BRIDGE)
    assert isinstance(vp, GDDIMMultistepScheduler) and vp.num_components == 1
    out = app._run(cld, app.VP_BRIDGE, 1, 3, 0)  # a CLD network sampled by the VP sampler (RecipeDenoiser)
    assert len(out) == 1
    assert isinstance(app._scheduler(base, app.GDDIM), GDDIMMultistepScheduler)
    sscs = app._scheduler(cld, app.SSCS)
    assert sscs.config.striding == "quadratic"
    with pytest.raises(app.gr.Error, match="sampler: .*cannot sample this model"):
        app._scheduler(cld, app.GDDIM)  # gDDIM needs Γ > 0: a clear error, not a traceback
    client = Client(server, verbose=False)
    info = client.view_api(return_format="dict", print_info=False)
    params = info["named_endpoints"]["/unconditional"]["parameters"]
    sampler = [p for p in params if p["parameter_name"] == "sampler"][0]
    assert sampler["parameter_default"] == app.VP_BRIDGE
    out = client.predict(app.GDDIM, 4, 0, 1, api_name="/unconditional")
    assert len(out) == 1
    out = client.predict(app.VP_BRIDGE, 4, 0, 1, api_name="/unconditional")
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


# ---------------------------------------------------------------- image-to-image (issue #15 §2)
def test_img2img_tab(server, image_file):
    client = Client(server, verbose=False)
    out = client.predict(handle_file(image_file), 0.3, app.GDDIM, 10, 0, 2, api_name="/img2img")
    assert len(out) == 2 and PIL.Image.open(out[0]["image"]).size == (app.DISPLAY_PX, app.DISPLAY_PX)
    again = client.predict(handle_file(image_file), 0.3, app.GDDIM, 10, 0, 2, api_name="/img2img")
    assert np.array_equal(np.asarray(PIL.Image.open(out[1]["image"])), np.asarray(PIL.Image.open(again[1]["image"])))
    out = client.predict(handle_file(image_file), 1.0, "Probability-flow Heun (ODE)", 4, 0, 1, api_name="/img2img")
    assert len(out) == 1
    with pytest.raises(Exception, match="image: upload an image"):
        client.predict(None, 0.3, app.GDDIM, 10, 0, 1, api_name="/img2img")
    with pytest.raises(Exception, match=r"strength. must be in \(0, 1\].*got 0"):
        client.predict(handle_file(image_file), 0.0, app.GDDIM, 10, 0, 1, api_name="/img2img")
    with pytest.raises(Exception, match=r"strength. must be in \(0, 1\].*got 1.5"):
        client.predict(handle_file(image_file), 1.5, app.GDDIM, 10, 0, 1, api_name="/img2img")
    with pytest.raises(Exception, match=r"strength.=0.0001 is below the last time"):
        client.predict(handle_file(image_file), 1e-4, app.SSCS, 10, 0, 1, api_name="/img2img")


@pytest.mark.parametrize("label", list(app.SAMPLERS))
def test_img2img_cost_counts_the_model_calls_that_run(label):
    """The demo's NFE for a strength is exactly the number of UNet calls PSLDImg2ImgPipeline makes."""
    base = app.untrained_pipeline()
    steps, strength = 12, 0.3
    nfe = app.img2img_nfe(app._scheduler(base, label), steps, strength)
    calls = []
    handle = base.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        sched = app._scheduler(base, label)
        unet = base.unet if sched.num_components == base.num_components else RecipeDenoiser(base.unet, base.scheduler)
        pipe = PSLDImg2ImgPipeline(unet=unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        pipe(image=torch.rand(1, 1, 8, 8), strength=strength, num_inference_steps=steps, output_type="pt")
    finally:
        handle.remove()
    assert 0 < nfe == len(calls) < steps
    assert app.img2img_nfe(app._scheduler(base, label), steps, 1.0) == steps


def test_img2img_cost_limit_uses_the_calls_that_run(server, image_file, monkeypatch):
    base = app.untrained_pipeline()
    steps, strength = 20, 0.2
    nfe = app.img2img_nfe(app._scheduler(base, app.SSCS), steps, strength)
    assert nfe < steps
    monkeypatch.setattr(app, "MAX_COST", 2 * nfe)  # the server runs in this process: the limit is read per request
    client = Client(server, verbose=False)
    out = client.predict(handle_file(image_file), strength, app.SSCS, steps, 0, 2, api_name="/img2img")
    assert len(out) == 2
    with pytest.raises(Exception, match=rf"costs {2 * steps} image-steps \(batch 2 × {steps} model calls \(strength 1"):
        client.predict(handle_file(image_file), 1.0, app.SSCS, steps, 0, 2, api_name="/img2img")


def test_img2img_rejects_a_non_image(server, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="image: 'notes.png' is not an image"):
        client.predict(handle_file(str(bad)), 0.3, app.GDDIM, 3, 0, 1, api_name="/img2img")


# ---------------------------------------------------------------- pipeline errors reach the page (not Gradio's generic one)
def test_non_finite_sampling_is_a_clear_error(nan_server, image_file):
    client = Client(nan_server, verbose=False)
    nan = r"sampling failed \(NaN or inf\): sampling call 1/3 .*UNet output"
    with pytest.raises(Exception, match=nan):
        client.predict(app.GDDIM, 3, 0, 1, api_name="/unconditional")
    with pytest.raises(Exception, match=nan):
        client.predict(handle_file(image_file), 1.0, app.GDDIM, 3, 0, 1, api_name="/img2img")
    with pytest.raises(Exception, match=nan):
        client.predict(handle_file(image_file), None, "keep left half", app.GDDIM, 3, 0, 1, api_name="/inpaint")


def test_pipeline_type_errors_are_clear_errors(server, image_file):
    base = app.untrained_pipeline()
    with pytest.raises(app.gr.Error, match="invalid input: `guidance_scale` must be a real number, got str 'abc'"):
        app._run(base, app.GDDIM, 1, 3, 0, guidance_scale="abc")  # TypeError raised by PSLDPipeline
    with pytest.raises(app.gr.Error, match=r"invalid input: `guidance_scale` must be a finite number in \[0, 1e6\], got -1.0"):
        app._run(base, app.GDDIM, 1, 3, 0, guidance_scale=-1.0)  # ValueError raised by PSLDPipeline
    with pytest.raises(app.gr.Error, match="sampling failed"):
        with app.pipeline_errors():
            raise NonFiniteError("x is not finite", cause="test")
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="invalid input: `strength` must be a real number, got str 'abc'"):
        client.predict(handle_file(image_file), "abc", app.GDDIM, 3, 0, 1, api_name="/img2img")


# ---------------------------------------------------------------- prediction_type / input preconditioning (issue #14)
def test_sufficient_epsilon_pipeline_loads_and_shows_its_type(suff_dir):
    pipe, status = app.load_pipeline(suff_dir)
    assert "UNTRAINED" not in status and pipe.unet.config.out_channels == 1
    assert pipe.scheduler.config.prediction_type == "sufficient_epsilon"
    info = app.model_info(pipe)
    assert 'prediction_type="sufficient_epsilon"' in info and "1 channel" in info
    assert "input preconditioning (σ_data = 0.6)" in info
    demo = app.build_demo(pipe, status)
    assert 'prediction_type=\\"sufficient_epsilon\\"' in json.dumps(demo.get_config_file())


def test_sufficient_epsilon_pipeline_every_tab(suff_server, image_file):
    client = Client(suff_server, verbose=False)
    for sampler in (app.GDDIM, app.SSCS, "Probability-flow Heun (ODE)"):
        assert len(client.predict(sampler, 4, 0, 2, api_name="/unconditional")) == 2
        assert len(client.predict(handle_file(image_file), 0.3, sampler, 10, 0, 1, api_name="/img2img")) == 1
    assert len(client.predict(3, 2.0, "Euler-Maruyama (SDE)", 3, 0, 1, api_name="/guided")) == 1
    out = client.predict(handle_file(image_file), None, "keep left half", app.SSCS, 4, 0, 1, api_name="/inpaint")
    got = np.asarray(PIL.Image.open(out[0]["image"]).convert("L").resize((8, 8), PIL.Image.NEAREST))
    want = np.asarray(PIL.Image.open(image_file))
    np.testing.assert_allclose(got[:, :4], want[:, :4], atol=3)
