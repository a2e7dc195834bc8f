"""Identifiers that end up in MQTT topics and file paths: fleet, group, device and model names.

One pattern for all of them, so that a name that is valid in a manifest is always valid in a
topic and can never escape a directory (no ``/``, ``+``, ``#`` or ``..``).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: A pydantic field type for identifiers.
Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_RE.pattern)]


def check_identifier(value: str, what: str = "identifier") -> str:
    """Return ``value`` if it is a valid identifier, else raise ``ValueError`` saying why."""
    if not IDENTIFIER_RE.match(value):
        raise ValueError(f"{what} {value!r} must match {IDENTIFIER_RE.pattern}")
    return value
