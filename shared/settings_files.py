"""``FileSettings``: the base of both deployables' settings (agent, cloud).

Sources, strongest first: keyword overrides (CLI flags), environment variables, a TOML file
chosen at run time, the defaults. pydantic-settings reads a TOML path from the class's
config, so ``load`` binds the chosen file by making a subclass that carries it; nothing is
read at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

S = TypeVar("S", bound="FileSettings")


class FileSettings(BaseSettings):
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @classmethod
    def load(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
        """Settings from ``overrides``, the environment and ``config_file`` (TOML)."""
        if config_file is not None and not config_file.is_file():
            raise FileNotFoundError(f"settings file {config_file} does not exist")
        config = {**cls.model_config, "toml_file": config_file}
        bound: type[S] = type(cls.__name__, (cls,), {"model_config": config})
        return bound(**overrides)
