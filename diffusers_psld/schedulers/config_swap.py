r"""Swapping between the package's scheduler classes with Diffusers' ``Other.from_config(scheduler.config)``.

Every class shares the ε-network and the shared arguments, but each runs its own ``sampler`` names.
:func:`choose_sampler` picks the sampler a target class should run so that a swap never loses one: a sampler
the target cannot run is replaced by the target's default and remembered in the hidden config key
``_sampler_by_class`` (class name → sampler), so a round trip restores it.
"""
from __future__ import annotations

import inspect
from typing import Optional

from diffusers.utils import logging

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

__all__ = ["SAMPLER_MEMORY_KEY", "check_config_sampler", "choose_sampler", "default_sampler"]

SAMPLER_MEMORY_KEY = "_sampler_by_class"


def default_sampler(class_name: str):
    """The default ``sampler`` of the package's scheduler class ``class_name`` (None for an unknown class)."""
    from . import schedulers_by_name  # late import: the package imports this module

    cls = schedulers_by_name().get(class_name)
    if cls is None:
        return None
    return inspect.signature(cls.__init__).parameters["sampler"].default


def check_config_sampler(config, source: Optional[str] = None, default_class: Optional[str] = None) -> None:
    """Refuse a config whose ``sampler`` its own class (``_class_name``, else ``default_class``) cannot run.

    A *valid* sampler of another class is fine (:func:`choose_sampler` swaps it for the target's default); a
    misspelt, differently-cased or non-string value is a ``ValueError`` naming ``source`` (the file, when known),
    the key and the valid values. A class name outside this package accepts any sampler of the package."""
    if "sampler" not in config:
        return
    from . import schedulers_by_name  # late import: the package imports this module

    classes = schedulers_by_name()
    value = config["sampler"]
    owner = classes.get(config.get("_class_name") or default_class)
    valid = owner._samplers if owner is not None else tuple(dict.fromkeys(n for c in classes.values() for n in c._samplers))
    if not (isinstance(value, str) and value in valid):
        raise ValueError(f"{source or 'scheduler config'}: `sampler` {value!r} is not a sampler of "
                         f"{owner.__name__ if owner is not None else 'diffusers_psld'}; valid values: {list(valid)}")


def choose_sampler(cls, config) -> dict:
    """The config ``cls.from_config`` should use (a copy) so that swapping classes never loses a sampler.

    Records the sampler the config's own class (``_class_name``) runs in the hidden key ``_sampler_by_class``
    (Diffusers keeps unknown ``_`` keys through ``from_config`` and ``save_pretrained``), then picks for ``cls``:
    the sampler remembered for ``cls`` if it runs it, else the config's sampler if ``cls`` runs it (an implicit
    default stays a default: Diffusers' ``_use_default_values`` rule), else ``cls``'s default (key dropped).

    The memory holds only what the config itself cannot: a class's entry is dropped once the config is that class's
    again (its sampler is then the ``sampler`` key), and an implicit default sampler is not recorded (it comes back as
    the default). So a round trip ``A.from_config(B.from_config(A(...).config).config)`` gives back a config equal
    to A's, hidden keys (``_use_default_values``, ``_sampler_by_class``) included.
    """
    config = dict(config)
    check_config_sampler(config, default_class=cls.__name__)
    src = config.get("_class_name", cls.__name__)
    memory = dict(config.get(SAMPLER_MEMORY_KEY) or {})
    defaults = list(config.get("_use_default_values", []))
    crossing = isinstance(src, str) and src != cls.__name__
    if crossing and "sampler" in config and "sampler" not in defaults \
            and config["sampler"] != default_sampler(src):  # a sampler the source class would not pick by default
        memory[src] = config["sampler"]
    remembered = memory.pop(cls.__name__, None)
    if crossing and remembered in cls._samplers:
        config["sampler"] = remembered
        if "sampler" in defaults:
            config["_use_default_values"] = [k for k in defaults if k != "sampler"]
    elif config.get("sampler", cls._samplers[0]) not in cls._samplers:
        logger.info(f"{cls.__name__}.from_config: sampler {config['sampler']!r} -> this class's default")
        config.pop("sampler")
    if memory:
        config[SAMPLER_MEMORY_KEY] = memory
    else:
        config.pop(SAMPLER_MEMORY_KEY, None)
    return config
