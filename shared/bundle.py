"""Reading a release bundle's files: labels and golden samples, each checked against the
digest its manifest lists.

A bundle is a directory: ``manifest.json``, the edge artifact, and the files of
``manifest.files`` (labels, golden inputs and outputs). The packager writes them, the
registry serves them beside the artifact, the updater downloads and verifies them, and the
agent reads them through this module, so every reader agrees on the formats:

- labels: ``.txt`` with one label per line (line *i* names class id *i*; an empty line
  leaves an id unnamed) or ``.json``, an object of class id to name (COCO-style maps with
  gaps: ``{"1": "person", "3": "car"}``);
- golden input: an image file (``.jpg``/``.jpeg``/``.png``, given to the agent as encoded
  bytes), a ``.npy`` array for the one input, or a ``.npz`` of arrays by input name;
- golden expected: a ``.npz`` of real-valued outputs by output name.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from shared.errors import ContractError
from shared.manifest import Manifest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Largest labels file read (a 1,001-class ImageNet list is about 10 KB).
MAX_LABELS_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Golden:
    """A golden sample read from the bundle: ``image`` (encoded bytes) or ``arrays`` (by
    input name; ``""`` for a ``.npy`` meant for the only input), and the expected outputs."""

    name: str
    image: bytes | None
    arrays: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


def read_file(manifest: Manifest, bundle: Path, name: str, max_bytes: int | None = None) -> bytes:
    """The bytes of bundle file ``name``, after checking its listed size and digest."""
    listed = manifest.file(name)
    if max_bytes is not None and listed.size > max_bytes:
        raise ContractError(f"{name} is {listed.size} bytes; at most {max_bytes} are read")
    try:
        data = (bundle / name).read_bytes()
    except OSError as exc:
        raise ContractError(f"cannot read bundle file {name}: {exc}") from None
    if len(data) != listed.size or hashlib.sha256(data).hexdigest() != listed.sha256:
        raise ContractError(f"bundle file {name} does not match its digest in the manifest")
    return data


def verify_files(manifest: Manifest, bundle: Path) -> None:
    """Every listed file is present with its digest (``ContractError`` otherwise)."""
    for f in manifest.files:
        read_file(manifest, bundle, f.name)


def parse_labels(name: str, data: bytes) -> dict[int, str]:
    """Class id -> label from a labels file's bytes (format by suffix, see the module)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ContractError(f"labels file {name} is not UTF-8") from None
    if name.endswith(".json"):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            raise ContractError(f"labels file {name} is not JSON") from None
        if not isinstance(doc, dict):
            raise ContractError(f"labels file {name} must hold an object of id to label")
        labels: dict[int, str] = {}
        for key, value in doc.items():
            if not isinstance(value, str) or not key.strip().lstrip("-").isdigit():
                raise ContractError(f"labels file {name}: {key!r}: {value!r} is not id: label")
            labels[int(key)] = value
        return labels
    return {i: line.strip() for i, line in enumerate(text.splitlines()) if line.strip()}


def labels_text(labels: list[str] | dict[int, str]) -> tuple[str, bytes]:
    """A labels file for ``labels``: a list becomes ``labels.txt``, a map with gaps (or not
    starting at 0) ``labels.json``. Returns (file name, bytes)."""
    if isinstance(labels, dict):
        ids = sorted(labels)
        if ids != list(range(len(ids))) or any("\n" in v or not v.strip() for v in labels.values()):
            doc = {str(i): labels[i] for i in ids}
            return "labels.json", json.dumps(doc, indent=0, ensure_ascii=False).encode()
        labels = [labels[i] for i in ids]
    if any("\n" in v or not v.strip() for v in labels):
        return labels_text(dict(enumerate(labels)))
    return "labels.txt", ("\n".join(labels) + "\n").encode()


def read_labels(manifest: Manifest, bundle: Path, name: str) -> dict[int, str]:
    return parse_labels(name, read_file(manifest, bundle, name, MAX_LABELS_BYTES))


def load_npz(name: str, data: bytes) -> dict[str, np.ndarray]:
    """Arrays of a ``.npz`` (never pickles)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {key: np.asarray(z[key]) for key in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ContractError(f"{name} is not a readable .npz: {exc}") from None


def load_npy(name: str, data: bytes) -> np.ndarray:
    try:
        return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))
    except (ValueError, OSError, EOFError) as exc:
        raise ContractError(f"{name} is not a readable .npy: {exc}") from None


def read_golden(manifest: Manifest, bundle: Path) -> list[Golden]:
    """The golden samples of a v2 manifest, read and checked."""
    cases = []
    for case in manifest.golden_cases:
        data = read_file(manifest, bundle, case.input)
        image, arrays = None, {}
        if case.input.lower().endswith(IMAGE_SUFFIXES):
            image = data
        elif case.input.endswith(".npz"):
            arrays = load_npz(case.input, data)
        elif case.input.endswith(".npy"):
            arrays = {"": load_npy(case.input, data)}
        else:
            raise ContractError(f"golden input {case.input}: not an image, .npy or .npz")
        expected = load_npz(case.expected, read_file(manifest, bundle, case.expected))
        missing = {o.name for o in manifest.outputs} - expected.keys()
        if missing:
            raise ContractError(f"golden {case.expected} lacks outputs {sorted(missing)}")
        cases.append(Golden(case.input, image, arrays, expected))
    return cases


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A ``.npz`` of ``arrays`` (uncompressed: golden outputs are small)."""
    buf = io.BytesIO()
    # typed as Any: NumPy 2's stubs read a ``**dict`` as its ``allow_pickle`` flag too
    np.savez(buf, **cast("dict[str, Any]", arrays))
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
