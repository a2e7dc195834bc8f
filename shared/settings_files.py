"""``FileSettings``: the base of both deployables' settings (agent, cloud), and the project's
one TOML reader.

Sources, strongest first: keyword overrides (CLI flags), environment variables, a TOML file
chosen at run time, the defaults. Overrides go through the constructor, so pydantic
validates them like any other source (``model_copy(update=...)`` would not), and a nested
section given as a dict is merged with the same section from the environment and the file.
Nothing is read at import time.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource

from shared.errors import TandemError

S = TypeVar("S", bound="FileSettings")

#: Parts of a field's path whose values are never echoed in an error message.
_SECRET_PARTS = ("password", "token", "secret", "key")


class SettingsError(TandemError):
    """Settings that cannot be used: a missing or malformed file, or a value out of range.
    The message is one line, fit for a command line's error."""


def _toml() -> Any:
    """``tomllib`` (Python 3.11+), else its backport ``tomli`` (a dependency on 3.10)."""
    try:
        return importlib.import_module("tomllib")
    except ImportError:
        return importlib.import_module("tomli")


def load_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict; ``SettingsError`` if it is missing, unreadable or malformed."""
    toml = _toml()
    try:
        data: dict[str, Any] = toml.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, toml.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from None
    return data


def describe(exc: ValidationError) -> str:
    """Every error of ``exc`` on one line: ``server.port: Input should be ... (got 99999)``.
    Values of secret fields are never repeated."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        text = f"{where}: {error['msg']}"
        value = error.get("input")
        secret = any(s in where.lower() for s in _SECRET_PARTS)
        if not secret and isinstance(value, (bool, int, float, str)) and len(str(value)) <= 80:
            text += f" (got {value!r})"
        parts.append(text)
    return "; ".join(parts)


class FileSettings(BaseSettings):
    #: The TOML file of this (bound) class; ``load`` makes a subclass that sets it.
    toml_path: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = getattr(settings_cls, "toml_path", None)
        data = load_toml(path) if path is not None else {}
        return (init_settings, env_settings, InitSettingsSource(settings_cls, data))

    @classmethod
    def load(cls: type[S], config_file: Path | str | None = None, **overrides: Any) -> S:
        """Settings from ``overrides``, the environment and ``config_file`` (TOML); any
        problem with any of them is one ``SettingsError`` naming every bad field."""
        path = Path(config_file) if config_file is not None else None
        namespace = {"toml_path": path, "__module__": cls.__module__}
        bound: type[S] = type(cls.__name__, (cls,), namespace)
        try:
            return bound(**overrides)
        except ValidationError as exc:
            raise SettingsError(f"invalid settings: {describe(exc)}") from None
