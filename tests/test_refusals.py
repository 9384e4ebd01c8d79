"""Inputs that used to be coerced, silently replaced or reported by an unrelated exception are refused with a
message naming the input, what was expected and (for files) the file."""
import json

import numpy as np
import pytest
import torch

from diffusers_psld import PSLDPipeline, PSLDScheduler, SSCSScheduler
from diffusers_psld.schedulers import GDDIMMultistepScheduler, SplittingScheduler
from diffusers_psld.sde import RecipeSDE

from _pipeline_stubs import tiny_unet


# ------------------------------------------------------------------ a saved scheduler's sampler
@pytest.mark.parametrize("bad", ["pf_heunn", "PF_HEUN", "heun", "sscs ", 7, None, ["em"]])
def test_saved_sampler_that_its_class_cannot_run_is_refused_on_load(tmp_path, bad):
    PSLDScheduler(sampler="pf_heun").save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["sampler"] = bad
    path.write_text(json.dumps(config))
    for cls in (PSLDScheduler, SSCSScheduler):  # also when another class loads it
        with pytest.raises(ValueError, match=r"scheduler_config\.json: `sampler` .* is not a sampler of PSLDScheduler; "
                                             r"valid values: \['em', 'pf_euler', 'pf_heun', 'sscs'\]"):
            cls.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a sampler of PSLDScheduler"):
        PSLDScheduler.from_config(config)


def test_bad_sampler_in_a_pipeline_directory_names_the_file(tmp_path):
    PSLDPipeline(unet=tiny_unet(), scheduler=PSLDScheduler()).save_pretrained(tmp_path)
    path = tmp_path / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["sampler"] = "pf_heunn"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"scheduler[/\\]scheduler_config\.json: `sampler` 'pf_heunn'"):
        PSLDPipeline.from_pretrained(tmp_path)


def test_valid_sampler_of_another_class_still_swaps_to_the_default_and_is_remembered(tmp_path):
    p = PSLDScheduler(sampler="pf_heun")
    s = SSCSScheduler.from_config(p.config)
    assert s.config.sampler == "sscs" and s.config["_sampler_by_class"]["PSLDScheduler"] == "pf_heun"
    assert PSLDScheduler.from_config(s.config).config.sampler == "pf_heun"
    p.save_pretrained(tmp_path)  # and through a file
    assert SSCSScheduler.from_pretrained(tmp_path).config.sampler == "sscs"
    assert SplittingScheduler.from_pretrained(tmp_path).config.sampler == SplittingScheduler().config.sampler
    assert GDDIMMultistepScheduler.from_pretrained(tmp_path).config.sampler == "gddim_multistep"


# ------------------------------------------------------------------ recipe parameters
@pytest.mark.parametrize("kw", [{"gamma": 1e308}, {"nu": 1e308}, {"nu": 1e160}, {"m_inv": 1e-320}])
def test_overflowing_recipe_parameters_are_value_errors(kw):
    with pytest.raises(ValueError, match="overflow float64"):
        RecipeSDE.psld(**kw)
    with pytest.raises(ValueError, match="overflow float64"):
        PSLDScheduler(**kw)


def test_huge_beta_giving_a_nan_kernel_is_refused():
    with pytest.raises(ValueError, match="transition kernel at t = 1 is not finite"):
        RecipeSDE.psld(beta_min=1e308, beta_max=1e308)
    RecipeSDE.psld(beta_min=1e6, beta_max=1e6)  # large but representable: the kernel is the prior


@pytest.mark.parametrize("kw, name", [({"gamma": "0.01"}, "gamma"), ({"nu": "4"}, "nu"), ({"gamma": True}, "gamma"),
                                      ({"kappa": b"0.04"}, "kappa"), ({"beta_min": "8"}, "beta_min")])
def test_recipe_strings_and_bools_are_refused_not_coerced(kw, name):
    with pytest.raises(ValueError, match=f"`{name}` must be a real number"):
        RecipeSDE.psld(**kw)


@pytest.mark.parametrize("masses", ["ab", "2", [True], [[1.0], [1.0, 2.0]], [1 + 2j]])
def test_recipe_masses_must_be_numbers(masses):
    with pytest.raises(ValueError, match="`masses` must be k positive numbers"):
        RecipeSDE(D=[[0.5]], Q=[[0.0]], masses=masses, beta_min=0.1, beta_max=20.0)


def test_recipe_numbers_keep_float64_precision():
    sde = RecipeSDE(D=np.array([[0.1]]), Q=[[0.0]], masses=(1,), beta_min=np.float64(0.1), beta_max=torch.tensor(20.0))
    assert sde.D.dtype == torch.float64 and sde.D.item() == 0.1  # not a float32 round trip
    assert RecipeSDE.psld().D[0, 0].item() == 0.005


# ------------------------------------------------------------------ sample_prior
@pytest.mark.parametrize("shape", [(-1, 2, 4, 4), (2, 2, -4, 4), (0, 2, 4, 4), (2.5, 2, 4, 4), (2, 3, 4, 4), (2,), 5])
def test_sample_prior_refuses_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"`shape` must be \[B, 2\*C, \.\.\.\]"):
        PSLDScheduler().sample_prior(shape)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, "float32", np.float32])
def test_sample_prior_refuses_non_float_dtypes(dtype):
    with pytest.raises(TypeError, match="`dtype` must be a floating-point torch.dtype"):
        PSLDScheduler().sample_prior((2, 2, 4, 4), dtype=dtype)


def test_sample_prior_accepts_torch_size_and_numpy_ints():
    z = PSLDScheduler().sample_prior(torch.Size([np.int64(2), 2, 4, 4]), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.float64)
    assert z.shape == (2, 2, 4, 4) and z.dtype == torch.float64
