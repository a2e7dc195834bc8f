"""TFLite Metadata read at packaging: from real MediaPipe models, and from models given
metadata here.

No model in the registry's wheels carries metadata *and* an embedded labels file *and*
loads in the TFLite runtime (MediaPipe's selfie segmenter has labels but a custom op; its
hand landmark model lists its label file against the wrong output). So these tests write
TFLite Metadata into a real model (fer's classifier) the way the metadata writer does:
a ``ModelMetadata`` flatbuffer (``metadata_schema.fbs``, built here with ``flatbuffers``)
stored as the model's ``TFLITE_METADATA`` buffer, and the associated files zipped onto
the model's end. The writer is ``tests/tflite_builder.py``; the reader is checked against the real
MediaPipe files too (image properties, normalisation, associated files), which the first
test reads, so the two do not merely agree with each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cloud.releases.registry import Registry
from cloud.releases.tflite_file import _box_format, read_tflite
from shared.bundle import read_golden, read_labels, verify_files
from shared.errors import ContractError
from tests.integration.conftest import PackageCli
from tests.real_models import photo, real_model
from tests.tflite_builder import metadata_buffer, with_metadata

EMOTIONS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


@pytest.fixture
def package(package_cli: PackageCli) -> Any:
    def run(edge: Path, name: str, *flags: str) -> tuple[int, str]:
        code, out, err = package_cli(edge, name, *flags)
        if code == 0:
            json.loads(out)
        return code, err

    return run


def test_reads_mediapipe_metadata() -> None:
    """What the real MediaPipe files carry: the face detector's image input (RGB, mean and
    std 127.5), and the hand landmark model's embedded handedness.txt."""
    face = read_tflite(real_model("face_detection_short_range").read_bytes())
    assert face.metadata_name == "Short Range Face Detection"
    assert (face.inputs, face.outputs) == (["input"], ["regressors", "classificators"])
    (image,) = face.input_meta
    assert (image.image, image.colour, image.mean, image.std) == (True, "RGB", [127.5], [127.5])
    assert not face.custom_ops and not face.stateful
    hand = read_tflite(real_model("hand_landmark_lite").read_bytes())
    assert hand.embedded.keys() == {"handedness.txt"}
    assert hand.output_meta[0].labels_file() is not None
    selfie = read_tflite(real_model("selfie_segmentation").read_bytes())
    assert selfie.custom_ops == ["Convolution2DTransposeBias"]
    assert selfie.output_meta[0].image and selfie.output_meta[0].colour == "GRAY"
    fer = read_tflite(real_model("fer_emotion").read_bytes())
    assert fer.metadata_name is None and not fer.has_metadata
    nabu = read_tflite(real_model("okay_nabu").read_bytes())
    assert nabu.stateful  # resource variables: VAR_HANDLE / READ / ASSIGN_VARIABLE


def test_the_written_metadata_reads_back() -> None:
    blob = with_metadata(
        real_model("fer_emotion").read_bytes(),
        metadata_buffer(),
        {"emotions.txt": b"\n".join(e.encode() for e in EMOTIONS)},
    )
    f = read_tflite(blob)
    assert f.metadata_name == "emotions with metadata" and f.inputs == ["x"]
    (image,), (out,) = f.input_meta, f.output_meta
    assert (image.image, image.colour, image.mean, image.std) == (True, "GRAY", [127.5], [127.5])
    labels = out.labels_file()
    assert labels is not None and (labels.name, labels.kind) == ("emotions.txt", "axis")
    assert f.embedded["emotions.txt"].decode().split("\n") == EMOTIONS


def test_a_model_with_metadata_packages_with_no_contract(tmp_path: Path, package: Any) -> None:
    """The issue's promise: ``--edge M.tflite --name NAME`` and a golden photo, nothing
    else. Task (one labelled output: classification), the gray image input and its
    normalisation, and the labels (the embedded file, now a bundle file) all come from the
    model; the face still reads happy."""
    edge = tmp_path / "emotions.tflite"
    edge.write_bytes(
        with_metadata(
            real_model("fer_emotion").read_bytes(),
            metadata_buffer(),
            {"emotions.txt": ("\n".join(EMOTIONS) + "\n").encode()},
        )
    )
    Image.fromarray(photo("astronaut")[40:200, 150:300]).save(tmp_path / "face.png")
    code, err = package(edge, "emotions", "--golden", str(tmp_path / "face.png"))
    assert code == 0, err
    registry = Registry(tmp_path / "reg")
    manifest = registry.manifest("emotions", 1)
    folder = registry.release_dir("emotions", 1)
    verify_files(manifest, folder)
    assert manifest.task == "classification"
    (x,), (y,) = manifest.inputs, manifest.outputs
    assert x.kind == "image" and x.image is not None
    assert (x.image.colour, x.image.mean, x.image.std) == ("GRAY", [127.5], [127.5])
    assert (y.role, y.labels) == ("scores", "emotions.txt")
    assert read_labels(manifest, folder, "emotions.txt") == dict(enumerate(EMOTIONS))
    (golden,) = read_golden(manifest, folder)
    assert EMOTIONS[int(golden.expected["Identity"].argmax())] == "happy"


def test_metadata_labels_that_do_not_fit_are_refused(tmp_path: Path, package: Any) -> None:
    edge = tmp_path / "emotions.tflite"
    edge.write_bytes(
        with_metadata(
            real_model("fer_emotion").read_bytes(),
            metadata_buffer(),
            {"emotions.txt": b"happy\nsad\n"},
        )
    )
    code, err = package(edge, "emotions")
    assert code == 1
    assert "labels file emotions.txt has 2 labels" in err and "has 7 classes" in err
    # ... and a contract file can drop them (and name a file of its own)
    (tmp_path / "mine.txt").write_text("\n".join(EMOTIONS))
    (tmp_path / "c.toml").write_text('[outputs.Identity]\nlabels = "mine.txt"\n')
    code, err = package(edge, "emotions", "--contract", str(tmp_path / "c.toml"))
    assert code == 0, err
    assert Registry(tmp_path / "reg").manifest("emotions", 1).outputs[0].labels == "mine.txt"


def test_metadata_naming_a_file_the_model_lacks_is_refused(tmp_path: Path, package: Any) -> None:
    edge = tmp_path / "emotions.tflite"
    edge.write_bytes(with_metadata(real_model("fer_emotion").read_bytes(), metadata_buffer(), {}))
    code, err = package(edge, "emotions")
    assert code == 1 and "names label file 'emotions.txt'" in err and "does not carry it" in err


def test_metadata_gray_on_a_three_channel_input_is_refused(tmp_path: Path, package: Any) -> None:
    """The metadata contradicting the tensor (GRAY on a 3-channel input) is the model's
    fault, said as such."""
    edge = tmp_path / "faces.tflite"
    edge.write_bytes(
        with_metadata(
            real_model("face_detection_short_range").read_bytes(),
            metadata_buffer(colour=2, labels_file=None),
            {},
        )
    )
    code, err = package(edge, "faces", "--task", "custom")
    assert code == 1 and "has 3 channels, GRAY has 1" in err


@pytest.mark.parametrize(
    ("kind", "index", "expected"),
    [
        (1, [], "xyxy"),  # BOUNDARIES: left, top, right, bottom
        (1, [1, 0, 3, 2], "yxyx"),  # SSD MobileNet's metadata: top, left, bottom, right
        (2, [], "xywh"),  # UPPER_LEFT
        (3, [], "cxcywh"),  # CENTER
        (1, [0, 2, 1, 3], None),  # left, right, top, bottom: no name for it
        (0, [], None),  # UNKNOWN
        (1, [0, 0, 1, 2], None),  # not a permutation
    ],
)
def test_box_format_from_bounding_box_properties(
    kind: int, index: list[float], expected: str | None
) -> None:
    assert _box_format(kind, index) == expected


def test_truncated_metadata_is_a_contract_error() -> None:
    """A model whose metadata buffer is cut short: an error naming the flatbuffer, never an
    IndexError or garbage."""
    whole = with_metadata(real_model("fer_emotion").read_bytes(), metadata_buffer(), {})
    f = read_tflite(whole)
    assert f.has_metadata
    meta = metadata_buffer()
    start = whole.find(meta)
    assert start > 0
    broken = bytearray(whole)
    broken[start : start + 4] = (len(meta) * 4).to_bytes(4, "little")  # root offset past the end
    with pytest.raises(ContractError, match="flatbuffer is truncated or corrupt"):
        read_tflite(bytes(broken))
