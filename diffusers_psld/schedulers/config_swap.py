r"""Swapping between the package's scheduler classes with Diffusers' ``Other.from_config(scheduler.config)``.

Every class shares the ε-network and the shared arguments, but each runs its own ``sampler`` names.
:func:`choose_sampler` picks the sampler a target class should run so that a swap never loses one: a sampler
the target cannot run is replaced by the target's default and remembered in the hidden config key
``_sampler_by_class`` (class name → sampler), so a round trip restores it.
"""
from __future__ import annotations

from diffusers.utils import logging

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

__all__ = ["SAMPLER_MEMORY_KEY", "choose_sampler"]

SAMPLER_MEMORY_KEY = "_sampler_by_class"


def choose_sampler(cls, config) -> dict:
    """The config ``cls.from_config`` should use (a copy) so that swapping classes never loses a sampler.

    Records the sampler the config's own class (``_class_name``) runs in the hidden key ``_sampler_by_class``
    (Diffusers keeps unknown ``_`` keys through ``from_config`` and ``save_pretrained``), then picks for ``cls``:
    the sampler remembered for ``cls`` if it runs it, else the config's sampler if ``cls`` runs it (an implicit
    default stays a default: Diffusers' ``_use_default_values`` rule), else ``cls``'s default (key dropped).
    """
    config = dict(config)
    src = config.get("_class_name", cls.__name__)
    memory = dict(config.get(SAMPLER_MEMORY_KEY) or {})
    if isinstance(src, str) and src != cls.__name__ and "sampler" in config:  # crossing classes: remember
        memory[src] = config["sampler"]
    remembered = memory.get(cls.__name__)
    defaults = list(config.get("_use_default_values", []))
    if src != cls.__name__ and remembered in cls._samplers:
        config["sampler"] = remembered
        if "sampler" in defaults:
            config["_use_default_values"] = [k for k in defaults if k != "sampler"]
    elif config.get("sampler", cls._samplers[0]) not in cls._samplers:
        logger.info(f"{cls.__name__}.from_config: sampler {config['sampler']!r} -> this class's default")
        config.pop("sampler")
    if memory:
        config[SAMPLER_MEMORY_KEY] = memory
    return config
