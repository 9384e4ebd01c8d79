"""Package layout (metadata: setup.cfg). The model-card templates live in the repository's ``model_cards/``
(the training scripts read them there) and ship inside the wheel as ``diffusers_psld/model_cards/``, where
``diffusers_psld.hub`` looks first."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["diffusers_psld", "diffusers_psld.*"]) + ["diffusers_psld.model_cards"],
    package_dir={"diffusers_psld.model_cards": "model_cards"},
    package_data={"diffusers_psld.model_cards": ["*.md"]},
)
