"""``tandem-cloud``: the cloud's command line. Settings are built here and passed down.

- ``serve``: the OIP server (and the registry, with ``--registry``);
- ``keys generate``: an Ed25519 signing key and the trust store devices pin;
- ``model package``: validate an edge model in the real interpreter, sign, publish;
- ``model optimize``: the model pipeline (``cloud/pipeline/``), which needs the build extra;
- ``fleet rollout | rollback | status``: see ``cloud/fleet/cli.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import ssl
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cloud.settings import CloudSettings
from shared.contract import TASKS
from shared.errors import TandemError
from shared.log_setup import setup_logging
from shared.settings_files import SettingsError, describe, load_toml


def _serve(settings: CloudSettings) -> int:
    import uvicorn

    from cloud.app import create_app
    from shared.tls import server_context

    tls = settings.tls
    if tls.cert_file is not None:  # a bad file: one line now, not a traceback from uvicorn
        server_context(tls.cert_file, tls.key_file, tls.client_ca_file)
    app = create_app(settings)
    # the loaded models, FastAPI and pydantic are long-lived: keeping them out of the garbage
    # collector's generations makes its full passes short (they stalled requests for tens of ms)
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        ssl_certfile=tls.cert_file,
        ssl_keyfile=tls.key_file,
        ssl_ca_certs=str(tls.client_ca_file) if tls.client_ca_file else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca_file else ssl.CERT_NONE,
    )
    return 0


def _keys_generate(args: argparse.Namespace) -> int:
    from shared.signing import SigningKey, TrustStore

    key = SigningKey.generate()
    key_path = args.dir / f"{args.name}.key"
    if key_path.exists():
        raise SystemExit(f"tandem-cloud: {key_path} exists; refusing to overwrite a key")
    key.save(key_path)
    (args.dir / f"{args.name}.pub").write_text(key.public_b64 + "\n")
    trust_path = args.dir / "trust.json"
    trust = TrustStore.load(trust_path) if trust_path.exists() else TrustStore()
    trust.add(key.public_b64)
    trust.save(trust_path)
    print(
        json.dumps(
            {"key_id": key.key_id, "private_key": str(key_path), "trust_store": str(trust_path)}
        )
    )
    return 0


def _model_package(args: argparse.Namespace) -> int:
    """``--name``: any model from its own contract (v2); ``--template``: the v1 path, a
    template manifest giving a feature-vector classifier's labels and golden samples."""
    if (args.template is None) == (args.name is None):
        raise SettingsError("give --name NAME (any model) or --template MANIFEST (v1), not both")
    if args.template is None:
        return _model_package_v2(args)
    from cloud.releases.packaging import PackageRequest, package
    from cloud.releases.registry import Registry
    from shared.manifest import CloudTarget, Manifest, RoutingDefaults
    from shared.signing import SigningKey

    stray = [f for f in ("contract", "labels", "golden", "task") if getattr(args, f)]
    if stray:
        raise SettingsError(f"--{', --'.join(stray)} go with --name, not with --template")
    template = (
        Manifest.load(args.template)
        if args.template.is_dir()
        else Manifest.from_json(args.template.read_text())
    )
    # flags are validated like the template's own fields (``model_copy`` would not)
    cloud = None
    routing = None
    try:
        if args.cloud_model:
            base = template.cloud.model_dump() if template.cloud else {}
            cloud = CloudTarget.model_validate(
                {**base, "model": args.cloud_model, "version": args.cloud_version}
            )
        if args.threshold is not None:
            routing = RoutingDefaults.model_validate(
                {**template.routing.model_dump(), "threshold": args.threshold}
            )
    except ValidationError as exc:
        raise SettingsError(f"invalid flag: {describe(exc)}") from None
    request = PackageRequest(
        edge=args.edge,
        template=template,
        version=args.version,
        cloud=cloud,
        routing=routing,
        expires_days=args.expires_days,
        min_agent_version=args.min_agent_version,
    )
    manifest = package(request, SigningKey.load(args.key), Registry(args.registry))
    print(
        json.dumps(
            {
                "model": manifest.model,
                "version": manifest.version,
                "sha256": manifest.edge.sha256,
                "key_id": manifest.key_id,
            }
        )
    )
    return 0


def _model_package_v2(args: argparse.Namespace) -> int:
    from cloud.releases.package_model import ModelPackageRequest, package_model
    from cloud.releases.registry import Registry
    from shared.identifiers import IDENTIFIER_RE
    from shared.signing import SigningKey

    if not IDENTIFIER_RE.match(args.name):
        raise SettingsError(f"--name {args.name!r}: letters, digits, '-' and '_' only")
    request = ModelPackageRequest(
        edge=args.edge,
        name=args.name,
        contract=args.contract,
        task=args.task,
        labels=args.labels,
        golden=list(args.golden or []),
        version=args.version,
        cloud_model=args.cloud_model,
        cloud_version=args.cloud_version,
        threshold=args.threshold,
        expires_days=args.expires_days,
        min_agent_version=args.min_agent_version,
    )
    manifest = package_model(request, SigningKey.load(args.key), Registry(args.registry))
    print(
        json.dumps(
            {
                "model": manifest.model,
                "version": manifest.version,
                "task": manifest.task,
                "format": manifest.edge.format,
                "sha256": manifest.edge.sha256,
                "files": [f.name for f in manifest.files],
                "key_id": manifest.key_id,
            }
        )
    )
    return 0


def _image_optimize(args: argparse.Namespace) -> int:
    """``--task image-classifier|image-detector``: the image pair built end to end
    (``cloud/pipeline/image_pipeline.py``: train, int8 TFLite edge, ONNX cloud, check,
    measure, calibrate routing per task), its headline figures printed as JSON."""
    if args.quick is not None and not 0 < args.quick <= 1:
        raise SettingsError(f"--quick: a share in (0, 1], got {args.quick}")
    from cloud.pipeline.image_pipeline import CLASSIFIER, DETECTOR, build_pair, quick

    pair = CLASSIFIER if args.task == "image-classifier" else DETECTOR
    if args.quick is not None:
        pair = quick(pair, args.quick)
    out: Path = args.out or Path("out/image")
    out.mkdir(parents=True, exist_ok=True)
    figures = build_pair(pair, out)
    print(json.dumps({"task": args.task, "out": str(out), **figures}, default=str))
    return 0


def _model_optimize(args: argparse.Namespace) -> int:
    """Runs the model pipeline (needs the ``build`` extra) and prints its headline figures.
    Its settings are checked before the heavy pipeline is imported."""
    if args.task != "digits":
        return _image_optimize(args)
    from cloud.pipeline.settings import OptimizeSettings

    values: dict[str, Any] = load_toml(args.settings) if args.settings is not None else {}
    for key in (
        "data",
        "teacher",
        "out",
        "max_escalation",
        "min_relative_accuracy",
        "epochs",
        "model",
        "seed",
    ):
        if (value := getattr(args, key, None)) is not None:
            values[key] = value
    for flag, key in (("epsilon", "guarantee_epsilon"), ("delta", "guarantee_delta")):
        if (value := getattr(args, flag, None)) is not None:
            values[key] = value
    for key in ("hidden", "sparsities"):
        if (value := getattr(args, key, None)) is not None:
            try:
                values[key] = [
                    float(v) if key == "sparsities" else int(v) for v in value.split(",")
                ]
            except ValueError:
                raise SettingsError(f"--{key}: comma-separated numbers, got {value!r}") from None
    try:
        settings = OptimizeSettings.model_validate(values)
    except ValidationError as exc:
        raise SettingsError(f"invalid pipeline settings: {describe(exc)}") from None
    from cloud.pipeline.run import optimize

    report = optimize(settings)
    op = report["routing"]["operating_point"]
    print(
        json.dumps(
            {
                "report": str(settings.out / "report.html"),
                "bundle": str(settings.out / report["bundle"]),
                "threshold": op["threshold"],
                "temperature": report["calibration"]["temperature"],
                "test_accuracy": op["test"]["accuracy"],
                "test_escalation": op["test"]["escalation"],
                "relative_accuracy": report["routing"]["relative_accuracy"],
                "chosen_by": report["routing"]["chosen_by"],
                "budget_threshold": report["routing"]["budget_threshold"],
                **(
                    {"guarantee_met": report["routing"]["guarantee"]["met"]}
                    if "guarantee" in report["routing"]
                    else {}
                ),
            },
            indent=2,
        )
    )
    return 0


def _model_retrain(args: argparse.Namespace, cloud: CloudSettings) -> int:
    """Distils the latest release of MODEL again on the split plus field samples (the sample
    store's, or ``--samples``), and publishes the signed candidate (latest + 1); prints a
    short before/after table and the new version."""
    from cloud.pipeline.settings import RetrainSettings

    values: dict[str, Any] = load_toml(args.settings) if args.settings is not None else {}
    values["model"] = args.model
    for key in (
        "data",
        "teacher",
        "out",
        "epochs",
        "seed",
        "max_field_samples",
        "max_escalation",
        "serving_version",
        "threshold_rule",
        "match_tolerance",
        "match_weighting",
        "audit_rate",
    ):
        if (value := getattr(args, key, None)) is not None:
            values[key] = value
    for flag, key in (("epsilon", "guarantee_epsilon"), ("delta", "guarantee_delta")):
        if (value := getattr(args, flag, None)) is not None:
            values[key] = value
    if args.hidden is not None:
        try:
            values["hidden"] = [int(v) for v in args.hidden.split(",")]
        except ValueError:
            raise SettingsError(f"--hidden: comma-separated numbers, got {args.hidden!r}") from None
    values.setdefault("out", f"out/retrain/{args.model}")
    try:
        settings = RetrainSettings.model_validate(values)
    except ValidationError as exc:
        raise SettingsError(f"invalid retrain settings: {describe(exc)}") from None
    if cloud.registry is None:
        raise SettingsError("model retrain needs --registry")
    from cloud.pipeline.field import from_samples, load_npz
    from cloud.pipeline.retrain import retrain_release, serving_release
    from cloud.releases.registry import Registry
    from shared.signing import SigningKey

    registry = Registry(cloud.registry)
    signing_key = SigningKey.load(args.key)
    if args.samples is not None:
        field = load_npz(args.samples)
    else:
        from cloud.fleet.samples.store import SampleStore
        from cloud.fleet.store import open_store

        current, _ = serving_release(registry, settings.model, settings.serving_version)
        assert current.input is not None  # a v1 release (serving_release checks)
        state_dir = args.state_dir or cloud.state_dir
        store = open_store(args.database_url or cloud.database_url, state_dir)
        # only the newest the retrain keeps are read: the whole store would not fit in memory
        samples = SampleStore(store, cloud.samples.root or state_dir / "samples").export_newest(
            args.fleet or cloud.fleet, settings.model, settings.max_field_samples
        )
        field, skipped = from_samples(samples, current.input.shape[-1])
        if skipped:
            print(
                f"tandem-cloud: {skipped} field samples skipped (not feature rows)", file=sys.stderr
            )
    manifest, report = retrain_release(settings, registry, signing_key, field)
    rows = [("original test", "original_test"), ("field held-out", "field_test")]
    print(f"{'':<16}{'':<8}{'edge acc':>10}{'agree':>8}{'escal':>8}{'hybrid':>8}")
    for title, part in rows:
        for when in ("before", "after"):
            f = report[when][part]
            print(
                f"{title:<16}{when:<8}{100 * f['edge_accuracy']:>9.2f}%"
                f"{100 * f['agreement_with_teacher']:>7.1f}%{100 * f['escalation']:>7.1f}%"
                f"{100 * f['hybrid_accuracy']:>7.2f}%"
            )
    print(
        json.dumps(
            {
                "model": manifest.model,
                "version": manifest.version,
                "sha256": manifest.edge.sha256,
                "threshold": manifest.routing.threshold,
                "chosen_by": report["routing"]["chosen_by"],
                "report": str(settings.out / "report.json"),
            }
        )
    )
    return 0


def _add_guarantee_flags(parser: argparse.ArgumentParser) -> None:
    """``model optimize`` and ``model retrain``: the seed and the guaranteed threshold."""
    parser.add_argument("--seed", type=int, help="seed for training (default 7)")
    parser.add_argument(
        "--epsilon",
        type=float,
        help="ship the guaranteed threshold: the edge's own answers wrong at most this share",
    )
    parser.add_argument(
        "--delta", type=float, help="... with probability at least 1 - delta (default 0.1)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem-cloud", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve an ONNX model repository over OIP (KServe v2)")
    serve.add_argument("--repo", type=Path, help="<repo>/<model>/<version>/model.onnx")
    serve.add_argument("--registry", type=Path, help="serve model bundles under /registry")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--simulated-delay-ms", type=float, help="demo only: add a wide-area round trip"
    )
    serve.add_argument("--repo-poll-s", type=float, help="rescan the repository (0: never)")
    serve.add_argument(
        "--bare-route",
        action="store_true",
        default=None,
        help="benchmark only: POST /bench/bare, the HTTP stack without inference",
    )

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="action", required=True)
    gen = keys.add_parser("generate", help="a new Ed25519 key, added to DIR/trust.json")
    gen.add_argument("--dir", type=Path, default=Path("keys"))
    gen.add_argument("--name", default="operator")

    model = sub.add_parser("model", help="model releases").add_subparsers(
        dest="action", required=True
    )
    pkg = model.add_parser(
        "package",
        help="validate, sign and publish an edge model (any TFLite/ONNX model with --name)",
    )
    pkg.add_argument("--edge", type=Path, required=True, help="the .tflite or .onnx artifact")
    pkg.add_argument("--name", help="the model's name in the registry (a v2 release)")
    pkg.add_argument(
        "--contract",
        type=Path,
        help="TOML: what the model does not say (task, input kinds, output roles, decoding, "
        "cloud target); see docs/examples/",
    )
    pkg.add_argument("--task", choices=TASKS, help="what the model is for")
    pkg.add_argument(
        "--labels", type=Path, help="labels file (.txt one per line, or .json id: label)"
    )
    pkg.add_argument(
        "--golden",
        type=Path,
        nargs="+",
        action="extend",
        help="golden samples: images (.jpg/.png), .npy, or .npz by input name",
    )
    pkg.add_argument(
        "--template",
        type=Path,
        help="v1: a manifest (or its folder) with labels, names, golden inputs and labels",
    )
    pkg.add_argument("--registry", type=Path, required=True)
    pkg.add_argument("--key", type=Path, required=True, help="private key (keys generate)")
    pkg.add_argument("--version", type=int, help="default: latest release + 1")
    pkg.add_argument(
        "--cloud-model", help="OIP model to escalate to (default: the template's or contract's)"
    )
    pkg.add_argument("--cloud-version")
    pkg.add_argument(
        "--threshold", type=float, help="routing threshold (default: the template's or contract's)"
    )
    pkg.add_argument("--expires-days", type=float, default=365.0)
    pkg.add_argument("--min-agent-version")

    opt = model.add_parser(
        "optimize",
        help="train, distill, quantize, prune, calibrate and measure edge variants (build extra)",
    )
    opt.add_argument(
        "--task",
        choices=("digits", "image-classifier", "image-detector"),
        default="digits",
        help="digits: the feature-vector MLP pipeline (the flags below); image-classifier / "
        "image-detector: a CNN pair on synthetic pictures (int8 TFLite edge, ONNX cloud)",
    )
    opt.add_argument(
        "--quick", type=float, help="image tasks: share of the pictures and epochs (0..1]"
    )
    opt.add_argument("--settings", type=Path, help="TOML with OptimizeSettings fields")
    opt.add_argument("--data", type=Path, help="split file (x, y, train, calib, test)")
    opt.add_argument("--teacher", type=Path, help="the cloud ONNX model")
    opt.add_argument("--out", type=Path, help="folder for this run")
    opt.add_argument("--model", help="the edge model's name in the registry")
    opt.add_argument("--hidden", help="edge hidden widths, e.g. 128,64")
    opt.add_argument("--epochs", type=int)
    opt.add_argument("--sparsities", help="pruning targets, e.g. 0.5,0.8")
    opt.add_argument("--max-escalation", help="escalation budget (0.2: 20%%; none: no budget)")
    opt.add_argument(
        "--min-relative-accuracy", help="hybrid / cloud-only accuracy (0.995; none: no target)"
    )
    _add_guarantee_flags(opt)

    re_ = model.add_parser(
        "retrain",
        help="distil MODEL's latest release again on the split plus field samples labelled "
        "by the cloud model; publish the signed candidate (latest + 1) (build extra)",
    )
    re_.add_argument("model", help="the edge model's name in the registry")
    re_.add_argument("--registry", type=Path, help="the registry (default: settings)")
    re_.add_argument("--data", type=Path, help="the split file optimize used")
    re_.add_argument("--teacher", type=Path, help="the cloud ONNX model: labels field samples")
    re_.add_argument("--key", type=Path, required=True, help="private key (keys generate)")
    re_.add_argument("--settings", type=Path, help="TOML with RetrainSettings fields")
    re_.add_argument("--samples", type=Path, help="field samples from .npz (x[, label, truth])")
    re_.add_argument("--fleet", help="the fleet whose samples to use (default: settings)")
    re_.add_argument("--state-dir", type=Path, help="the sample store's folder (settings)")
    re_.add_argument("--database-url", help="the fleet store (default: settings)")
    re_.add_argument("--max-field-samples", type=int, help="the newest N (default 2000)")
    re_.add_argument(
        "--serving-version",
        type=int,
        help="the release the fleet serves: retrained and matched (default: the latest)",
    )
    re_.add_argument(
        "--threshold-rule",
        choices=("match", "budget"),
        help="match (default): least escalation keeping the serving model's hybrid accuracy "
        "on calibration data; budget: --max-escalation as optimize does",
    )
    re_.add_argument(
        "--match-tolerance", type=float, help="hybrid accuracy match may give up (default 0)"
    )
    re_.add_argument(
        "--match-weighting",
        choices=("captured", "importance"),
        help="field samples as captured (default), or audits weighted 1/--audit-rate",
    )
    re_.add_argument("--audit-rate", type=float, help="the devices' audit rate (0.02)")
    re_.add_argument("--max-escalation", help="escalation budget (0.2; none: no budget)")
    re_.add_argument("--hidden", help="edge hidden widths (default: the serving model's)")
    re_.add_argument("--epochs", type=int)
    re_.add_argument("--out", type=Path, help="folder for this run (out/retrain/MODEL)")
    _add_guarantee_flags(re_)

    from cloud.fleet.cli import add_fleet_parser

    add_fleet_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        key: value
        for key in (
            "repo",
            "host",
            "port",
            "registry",
            "repo_poll_s",
        )
        if (value := getattr(args, key, None)) is not None
    }
    testing = {
        key: value
        for key in ("simulated_delay_ms", "bare_route")
        if (value := getattr(args, key, None)) is not None
    }
    if testing:
        overrides["testing"] = testing
    try:
        if args.command == "fleet":
            from cloud.fleet.cli import fleet_overrides

            overrides |= fleet_overrides(args)
        # through the loader, so flags are validated and merged with the file's sections
        settings = CloudSettings.load(args.config, **overrides)
        setup_logging(settings.log_level)
        if args.command == "serve":
            return _serve(settings)
        if args.command == "keys":
            return _keys_generate(args)
        if args.command == "model":
            if args.action == "retrain":
                return _model_retrain(args, settings)
            return _model_optimize(args) if args.action == "optimize" else _model_package(args)
        from cloud.fleet.cli import run_fleet

        return run_fleet(args, settings)
    except SettingsError as exc:
        parser.exit(2, f"tandem-cloud: error: {exc.message}\n")
    except TandemError as exc:
        print(f"tandem-cloud: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
