"""Loading a pydantic-settings class with a TOML file chosen at run time.

pydantic-settings reads a TOML path from the class's config, so the path given on a command
line is bound by making a subclass that carries it. Both deployables (agent, cloud) load
their settings through this one function; nothing is read at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], config_file: Path | None, overrides: dict[str, Any]) -> S:
    """An instance of ``cls`` from overrides, the environment and ``config_file``."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"settings file {config_file} does not exist")
    config = {**cls.model_config, "toml_file": config_file}
    bound: type[S] = type(cls.__name__, (cls,), {"model_config": config})
    return bound(**overrides)
