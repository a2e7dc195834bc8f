"""Logging for both command lines: one format on stderr, and HTTP clients kept quiet.

httpx logs every request at INFO: on a device escalating to its cloud that was 685 of 696
log lines, written to an SD card that wears with every write. Its loggers (and httpcore's)
stay at WARNING unless the chosen level is DEBUG.
"""

from __future__ import annotations

import logging
import sys

from shared.settings_files import SettingsError

#: Loggers that speak per request, heard only at DEBUG.
CHATTY = ("httpx", "httpcore")


def setup_logging(level_name: str) -> None:
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        raise SettingsError(f"log_level: unknown level {level_name!r} (DEBUG, INFO, WARNING...)")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in CHATTY:
        logging.getLogger(name).setLevel(
            logging.NOTSET if level <= logging.DEBUG else logging.WARNING
        )
