"""The network carries what it was trained for (``_psld_training`` in its config) and pipelines refuse a
scheduler that contradicts it: at construction, at load and when ``pipe.scheduler`` is replaced before a call."""
import json
import logging

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.utils import logging as dlogging

from diffusers_psld import PSLDImg2ImgPipeline, PSLDPipeline, PSLDScheduler, SSCSScheduler
from diffusers_psld import training_record
from diffusers_psld.evaluation import eps_model_score_fn
from diffusers_psld.schedulers import GDDIMMultistepScheduler

from _pipeline_stubs import tiny_unet


def sample(pipe, steps=3):
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=1, num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0)).images


def c_channel_unet():  # "sample" / "sufficient_epsilon" networks output C channels
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1)


@pytest.fixture()
def saved(tmp_path):
    sched = PSLDScheduler(gamma=0.02, input_preconditioning=True, sigma_data=0.4, prediction_type="sample")
    PSLDPipeline(unet=c_channel_unet(), scheduler=sched).save_pretrained(tmp_path)
    return tmp_path


def test_save_writes_the_record_into_the_unet_config(saved):
    rec = json.loads((saved / "unet" / "config.json").read_text())[training_record.RECORD_KEY]
    assert rec == {"diffusion": "psld", "beta_min": 8.0, "beta_max": 8.0, "time_scale": 1000.0,
                   "prediction_type": "sample", "input_preconditioning": True, "sigma_data": 0.4,
                   "gamma": 0.02, "nu": 4.01, "kappa": 0.04, "m_inv": (4.01 - 0.02) ** 2 / 4}


def test_record_loads_without_diffusers_warnings_and_survives_a_resave(saved, tmp_path, caplog):
    dlogging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            pipe = PSLDPipeline.from_pretrained(saved)
    finally:
        dlogging.disable_propagation()
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]
    assert training_record.record_in(pipe.unet)["sigma_data"] == 0.4
    assert training_record.record_in(UNet2DModel.from_config(pipe.unet.config)) == training_record.record_in(pipe.unet)
    pipe.unet.save_pretrained(tmp_path / "unet-alone")
    assert training_record.record_in(UNet2DModel.from_pretrained(tmp_path / "unet-alone")) == training_record.record_in(pipe.unet)


def test_free_choices_stay_free(saved):
    pipe = PSLDPipeline.from_pretrained(saved)
    ref = pipe.scheduler.config
    for sched in (SSCSScheduler.from_config(ref), GDDIMMultistepScheduler.from_config(ref),
                  PSLDScheduler.from_config(ref, sampler="pf_heun", striding="quadratic", sampling_eps=1e-4,
                                            project_eps=True),
                  PSLDScheduler.from_config(ref, beta_min=8.0, beta_max=8.0, m_inv=(4.01 - 0.02) ** 2 / 4)):
        pipe.scheduler = sched
        assert sample(pipe).shape == (1, 1, 8, 8)


CONTRADICTIONS = [
    ({"prediction_type": "sufficient_epsilon"}, "prediction_type='sample'", "prediction_type='sufficient_epsilon'"),
    ({"input_preconditioning": False}, "input_preconditioning=True", "input_preconditioning=False"),
    ({"sigma_data": 0.5}, "sigma_data=0.4", "sigma_data=0.5"),
    ({"gamma": 0.01}, "gamma=0.02", "gamma=0.01"),
    ({"nu": 5.0}, "nu=4.01", "nu=5.0"),
    ({"m_inv": 1.0}, "m_inv=3.98", "m_inv=1.0"),
    ({"kappa": 0.1}, "kappa=0.04", "kappa=0.1"),
    ({"beta_min": 0.1, "beta_max": 20.0}, "beta_min=8.0, beta_max=8.0", "beta_min=0.1, beta_max=20.0"),
    ({"time_scale": 1.0}, "time_scale=1000.0", "time_scale=1.0"),
]


@pytest.mark.parametrize("change, trained, given", CONTRADICTIONS)
def test_contradicting_scheduler_is_refused_everywhere(saved, change, trained, given):
    pipe = PSLDPipeline.from_pretrained(saved)
    bad = PSLDScheduler.from_config(pipe.scheduler.config, **change)
    match = f"trained with {trained}.*says {given}"
    with pytest.raises(ValueError, match=match):  # construction (also a UNet loaded alone)
        PSLDPipeline(unet=UNet2DModel.from_pretrained(saved, subfolder="unet"), scheduler=bad)
    with pytest.raises(ValueError, match=match):  # load with a scheduler passed in
        PSLDPipeline.from_pretrained(saved, scheduler=bad)
    for cls in (PSLDPipeline, PSLDImg2ImgPipeline):  # `pipe.scheduler` replaced before a call
        p = cls(**pipe.components)
        p.scheduler = bad
        with pytest.raises(ValueError, match=match):
            p(batch_size=1, num_inference_steps=3) if cls is PSLDPipeline else \
                p(image=torch.zeros(1, 1, 8, 8), strength=0.5, num_inference_steps=3)
    with pytest.raises(ValueError, match=match):  # a saved scheduler config edited by hand
        bad.save_pretrained(saved / "scheduler")
        PSLDPipeline.from_pretrained(saved)
    with pytest.raises(ValueError, match=match):  # likelihood evaluation combines them too
        eps_model_score_fn(pipe.unet, bad)


def test_diffusion_mismatch_names_the_diffusion_only(saved):
    unet = UNet2DModel.from_pretrained(saved, subfolder="unet")
    rec = training_record.record_in(unet)
    unet.register_to_config(**{training_record.RECORD_KEY: {**rec, "diffusion": "vp"}})
    with pytest.raises(ValueError, match=r"trained with diffusion='vp' .* says diffusion='psld': it would sample"):
        PSLDPipeline(unet=unet, scheduler=PSLDScheduler.from_pretrained(saved, subfolder="scheduler"))


def test_directories_without_a_record_load_and_sample_as_before(tmp_path):
    PSLDPipeline(unet=tiny_unet(), scheduler=PSLDScheduler()).save_pretrained(tmp_path)
    path = tmp_path / "unet" / "config.json"
    config = json.loads(path.read_text())
    del config[training_record.RECORD_KEY]
    path.write_text(json.dumps(config))
    pipe = PSLDPipeline.from_pretrained(tmp_path, scheduler=PSLDScheduler(gamma=0.05))  # nothing to check against
    assert training_record.record_in(pipe.unet) is None
    ref = sample(pipe)
    pipe.save_pretrained(tmp_path / "again")  # re-saving records the pipeline's scheduler
    assert training_record.record_in(PSLDPipeline.from_pretrained(tmp_path / "again").unet)["gamma"] == 0.05
    torch.testing.assert_close(sample(PSLDPipeline.from_pretrained(tmp_path / "again")), ref, atol=0, rtol=0)


def test_save_refuses_to_record_over_a_contradicting_scheduler(saved, tmp_path):
    pipe = PSLDPipeline.from_pretrained(saved)
    pipe.scheduler = PSLDScheduler.from_config(pipe.scheduler.config, gamma=0.3)
    with pytest.raises(ValueError, match="trained with gamma=0.02"):
        pipe.save_pretrained(tmp_path / "out")


def test_vp_record_has_only_what_enters_vp():
    rec = training_record.record_of(PSLDScheduler(diffusion="vp", gamma=0.5))
    assert rec == {"diffusion": "vp", "beta_min": 0.1, "beta_max": 20.0, "time_scale": 1000.0,
                   "prediction_type": "epsilon", "input_preconditioning": False}
