"""Where the benchmarks put what they measured: one JSON file each, said on stdout."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, doc: object) -> None:
    """``doc`` as indented JSON at ``path`` (its folder made), then ``wrote <path>``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
